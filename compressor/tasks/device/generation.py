"""Text generation on the device: prompts in the chat template, greedy tokens out through the KV-cache
loop of generation_runtime.py (copied beside this file), streamed as text."""

from __future__ import annotations

import sys
from typing import Any, Iterator

if "predict" in sys.modules:  # inside a bundle: the copies beside this file, which predict.py loaded
    from generation_runtime import OnnxCausalLM
    from predict import BundleError
else:
    from compressor.bundle.device.generation_runtime import OnnxCausalLM
    from compressor.bundle.device.runtime import BundleError


def _server_module() -> Any:
    """generation_server: the bundle's copy inside a bundle, the installed module on the host."""
    if "predict" in sys.modules:
        import generation_server

        return generation_server
    from compressor.tasks.device import generation_server

    return generation_server


class Answers:
    """{text} per prompt; `stream` yields the answer piece by piece; golden outputs are greedy tokens."""

    golden_kind = "tokens"

    def __init__(self, predictor: Any):
        self.predictor = predictor
        self.tokenizer = predictor.tokenizer
        self.generation = predictor.manifest["generation"]
        self.lm = OnnxCausalLM(predictor.model_file, session=predictor.session)

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt as the model was trained to read it (in the chat template, when it has one)."""
        text = self.generation["prompt_format"].format(prompt=prompt)
        return self.tokenizer.encode(text, add_special_tokens=self.generation["add_special_tokens"]).ids

    def _greedy(self, prompt: str, max_new_tokens: int | None) -> Iterator[int]:
        """The greedy answer's token ids, one at a time, until a stop token or the limit."""
        return self.lm.stream(self.prompt_ids(prompt), max_new_tokens or self.generation["max_new_tokens"],
                              set(self.generation["stop_ids"]))

    def tokens(self, prompt: str, max_new_tokens: int | None = None) -> list[int]:
        """The greedy answer's token ids, until a stop token or the limit."""
        return list(self._greedy(prompt, max_new_tokens))

    def stream(self, prompt: str, max_new_tokens: int | None = None) -> Iterator[str]:
        """The greedy answer as text pieces, one per generated token (decoded so far, minus what was given)."""
        ids: list[int] = []
        shown = ""
        for token in self._greedy(prompt, max_new_tokens):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text

    @classmethod
    def routes(cls, app: Any, server: Any) -> None:
        """OpenAI's /v1/completions and /v1/chat/completions (generation_server.py)."""
        _server_module().routes(app, server)

    def start_serving(self, server: Any) -> None:
        """Start the continuous-batching scheduler (the server has loaded the model)."""
        self.scheduler = _server_module().Scheduler(self, server)
        self.server = server

    def stop_serving(self) -> None:
        """Stop the scheduler."""
        self.scheduler.stop()

    async def serve_answer(self, texts: list[Any]) -> list[Any]:
        """KServe's infer: each text as one user turn, answered greedily."""
        module = _server_module()
        out = []
        for text in texts:
            answer, _ = await module.generate(self.server, self.generation["prompt_format"].format(prompt=text),
                                              self.generation["add_special_tokens"],
                                              self.generation["max_new_tokens"])
            out.append({"text": answer})
        return out

    def predict(self, texts: list[Any]) -> list[Any]:
        """The whole greedy answer per prompt."""
        return [{"text": "".join(self.stream(t))} for t in texts]

    def golden(self, inputs: list[Any], new_tokens: int) -> list[dict[str, Any]]:
        """What verify compares exactly: the first `new_tokens` greedy tokens of each input."""
        return [{"input": text, "tokens": self.tokens(text, new_tokens)} for text in inputs]

    def check(self, i: int, case: dict[str, Any], tolerance: float, here: str, golden_on: str | None) -> float:
        """Raise BundleError unless the greedy tokens are the golden ones; 0.0 (tokens have no distance)."""
        got = self.tokens(case["input"], len(case["tokens"]) or 1)
        if got != case["tokens"][: len(got)] or len(got) < len(case["tokens"]):
            at = next((k for k, (a, b) in enumerate(zip(got, case["tokens"])) if a != b),
                      min(len(got), len(case["tokens"])))
            where = (f" (this CPU runs {here} int8 kernels, the golden tokens were made with {golden_on} "
                     "kernels: integer rounding differs between CPU classes)" if golden_on and golden_on != here
                     else "")
            raise BundleError(f"golden[{i}]: greedy tokens differ from token {at} on for input {case['input']!r}: "
                              f"{self.tokenizer.decode(got)!r} instead of {self.tokenizer.decode(case['tokens'])!r}"
                              f"{where}")
        return 0.0
