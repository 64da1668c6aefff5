"""`text-generation`: decoder LLMs (Llama-family). Perplexity on a text corpus (lower is better), accuracy of
greedy answers to instruction rows, time to first token, decode tokens/s and the process's peak RSS.

Rows are `Example(prompt, completion)`: from jsonl (data.text / data.label keys), or from a labelled
file read as an instruction task (data.prompt, a template with `{text}`, and data.completions, the
answer for each label). A prompt is wrapped in the tokenizer's chat template when data.chat_template
asks for it (or, by default, when the tokenizer has one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from compressor.models.artifact import Artifact
from compressor.models.formats import format_named
from compressor.tasks.base import DistillPairs, Metric, Task

IGNORE = -100


class GenerationEvalConfig(BaseModel):
    """`evaluate.task:` for text-generation."""

    model_config = ConfigDict(extra="forbid")

    perplexity_file: str | None = Field(default=None, description="Plain text whose perplexity is reported "
                                        "(relative to the recipe), e.g. wikitext-2/test.txt.")
    perplexity_tokens: int = Field(default=4096, ge=2, le=10_000_000, description="Score the file's first N tokens "
                                   "(unless perplexity_windows is set).")
    perplexity_windows: int | None = Field(default=None, ge=1, le=1_000_000, description="Score N windows of "
                                           "`window` tokens spread evenly over the whole file instead: a figure "
                                           "that one hard stretch of text does not decide (docs/llms.md).")
    window: int = Field(default=512, ge=2, le=32768, description="Tokens per window; windows do not overlap and "
                                                                 "each starts without context.")
    accuracy_rows: int | None = Field(default=200, ge=1, description="Greedy answers to the first N eval rows "
                                      "(null: all), scored by exact match with the completion.")
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096, description="Longest greedy answer for "
                                       "accuracy (default: the longest completion's tokens + 1, the most an exact "
                                       "match can use).")
    prompt_tokens: int = Field(default=128, ge=1, le=32768, description="Prompt length for time to first token.")
    new_tokens: int = Field(default=128, ge=1, le=32768, description="Tokens timed for decode tokens/s.")
    timing_runs: int = Field(default=3, ge=1, le=100, description="Timed generations (the best is reported).")


def chat_wrap(tokenizer: Any, prompt: str, chat: bool | None) -> list[int]:
    """Token ids of a prompt, in the chat template (a user turn, then the assistant's turn begins) when
    `chat` is true, or when it is None and the tokenizer has a template."""
    use = chat if chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if use:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding
    return list(tokenizer(prompt)["input_ids"])


#: What a generation bundle carries beside model.onnx and tokenizer.json: the cache shape for our loop, and
#: what onnxruntime-genai's runtime (`og.Model(bundle)`) reads.
GENERATION_FILES = ("genai_config.json", "config.json", "generation_config.json", "tokenizer_config.json")

def stop_ids(tokenizer: Any, config: dict[str, Any] | None = None) -> set[int]:
    """Tokens that end an answer: the tokenizer's eos and the model's generation eos ids."""
    found = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = (config or {}).get("eos_token_id")
    found |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return found


def normalise(text: str) -> str:
    """An answer as exact match compares it: lower case, no surrounding spaces or final punctuation."""
    return text.strip().lower().rstrip(".!").strip()


class TextGeneration(Task):
    """A causal LM (LlamaForCausalLM and the like)."""

    name = "text-generation"
    summary = "decoder LLMs; perplexity (lower is better), instruction accuracy, TTFT and decode tokens/s"
    auto_class = "AutoModelForCausalLM"
    head_suffix = "ForCausalLM"
    peft_task_type = "CAUSAL_LM"
    export_task = "text-generation-with-past"
    metrics = (Metric("perplexity", higher_is_better=False), Metric("accuracy", top=1.0))
    needs_labels = False
    model_inputs = ("input_ids", "attention_mask")
    golden_inputs = ("What is the capital of France?", "Name three colours.")
    device_module = "compressor.tasks.device.generation"
    timing_description = "generation timed in a fresh process per model (see Generation)"

    def report_sections(self, record: dict[str, Any]) -> list[str]:
        """Generation: instruction accuracy, time to first token, decode speed and peak memory per artifact."""
        from compressor.tasks.generation_report import generation_markdown

        return generation_markdown(record)

    def bundle_files(self, artifact: Artifact) -> dict[str, Any]:
        """The KV-cache loop the evaluator measured, and what onnxruntime-genai's own runtime reads
        (`og.Model(bundle)`): a builder graph leaves the cache's head count and width symbolic, the loop reads
        them from config.json."""
        from compressor.bundle.device import generation_runtime

        from compressor.tasks.device import generation_server

        files = {"generation_runtime.py": Path(generation_runtime.__file__),
                 "generation_server.py": Path(generation_server.__file__)}
        return files | {name: artifact.path / name for name in GENERATION_FILES if (artifact.path / name).is_file()}

    def bundle_manifest(self, artifact: Artifact) -> dict[str, Any]:
        """`generation`: the prompt format, stop ids and default answer length the device module reads."""
        return {"generation": generation_spec(artifact)}
    distill_positions = ("all", "completion")
    EvalConfig: ClassVar[type[BaseModel]] = GenerationEvalConfig

    def collate(self, tokenizer: Any, rows: list[Any], label_map: dict[str, int], max_length: int) -> dict:
        """Prompt + completion + end of turn, right-padded; the loss covers the completion tokens only
        (a row without a completion is plain text: every token counts)."""
        import torch

        eos = tokenizer.eos_token_id
        seqs, labels = [], []
        for row in rows:
            if row.label is None:
                ids = list(tokenizer(row.text)["input_ids"])[:max_length]
                seqs.append(ids)
                labels.append(list(ids))
                continue
            prompt = chat_wrap(tokenizer, row.text, row.chat)
            answer = list(tokenizer(str(row.label), add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
            ids = (prompt + answer)[-max_length:]  # keep the answer when a prompt is too long
            seqs.append(ids)
            labels.append(([IGNORE] * len(prompt) + answer)[-max_length:])
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
                "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                "labels": torch.tensor([l + [IGNORE] * (width - len(l)) for l in labels])}

    def score(self, rows: list[Any], predictions: list[Any], labels: list[str]) -> dict[str, float]:
        """Exact-match accuracy of greedy answers against the completions."""
        hits = sum(normalise(p) == normalise(str(r.label)) for p, r in zip(predictions, rows))
        return {"accuracy": hits / max(1, len(rows))}

    def parity(self, reference: Artifact, candidate: Artifact, texts: list[Any], threads: int) -> dict[str, Any]:
        """Twice: the largest |logit difference| over every position of real prompts, and identical greedy
        tokens (16 new ones, through the KV cache) for the first four prompts."""
        import numpy as np

        from compressor.models.loading import load_tokenizer

        tokenizer = load_tokenizer(reference.path)
        prompts = [chat_wrap(tokenizer, str(t), None) for t in texts]
        ref, cand = _Model(reference, threads), _Model(candidate, threads)
        worst = max(float(np.abs(ref.logits(p) - cand.logits(p)).max()) for p in prompts)
        stop = stop_ids(tokenizer, _generation_config(reference.path))
        pad = tokenizer.pad_token_id or 0
        want, got = ref.greedy(prompts[:4], 16, stop, pad), cand.greedy(prompts[:4], 16, stop, pad)
        same = sum(w == g for w, g in zip(want, got))
        problem = None
        if same < len(want):
            i = next(k for k, (w, g) in enumerate(zip(want, got)) if w != g)
            problem = (f"greedy tokens differ for prompt {i} ({tokenizer.decode(want[i])!r} → "
                       f"{tokenizer.decode(got[i])!r})")
        return {"max_abs_diff": worst, "problem": problem, "greedy_identical": f"{same}/{len(want)}"}

    def distill_targets(self, student_logits: Any, teacher_logits: Any, labels: Any) -> tuple[Any, Any, Any]:
        """One row per predicted token: position t predicts token t+1, where that token counts."""
        s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
        keep = y != IGNORE
        return s[keep], t[keep], y[keep]

    def distill_pairs(self, student_logits: Any, teacher_logits: Any, labels: Any, attention_mask: Any,
                      positions: str | None = None) -> DistillPairs:
        """Next-token rows (position t predicts token t+1): the hard loss reads the tokens that carry a label
        (the completion and its end of turn; every token of plain text); the KL reads those too with
        positions `completion`, or, with `all` (the default), every position whose next token is not padding,
        prompt included, so that the student learns the teacher's language model and not only the answers."""
        s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
        hard = y != IGNORE
        soft = hard
        if (positions or self.distill_positions[0]) == "all" and attention_mask is not None:
            soft = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        return DistillPairs(s[soft], t[soft], s[hard], y[hard])

    def evaluate_in_memory(self, model: Any, tokenizer: Any, rows: list[Any], labels: list[str],
                           max_length: int) -> float:
        """Perplexity of an in-memory PyTorch model on the tokens of `rows` that carry a label (the completions
        and their end of turn; every token of plain text), collated as for training."""
        import math

        import torch
        import torch.nn.functional as F

        total, count = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(rows), 8):
                batch = self.collate(tokenizer, rows[i : i + 8], {}, max_length)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                y = batch["labels"][:, 1:]
                total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum"))
                count += int((y != IGNORE).sum())
        return math.exp(total / max(1, count))


class GenerationEvaluator:
    """Perplexity, instruction accuracy and generation speed of a causal LM, on PyTorch or ONNX Runtime."""

    task = TextGeneration.name
    formats = ("hf", "onnx")
    metric = "perplexity"
    version = "3"  # 3: ONNX decode timed through the runtime's shared cache buffer where the graph asks for one

    def evaluate(self, artifact: Artifact, rows: list[Any], settings: Any) -> dict[str, Any]:
        """Every measurement the recipe's evaluate.task asks for."""
        from compressor.models.loading import load_tokenizer

        config = GenerationEvalConfig.model_validate(getattr(settings, "task", None) or {})
        tokenizer = load_tokenizer(artifact.path)
        model = _Model(artifact, settings.threads)
        result: dict[str, Any] = {}
        if config.perplexity_file:
            file = Path(config.perplexity_file)
            result.update(spread_perplexity(model, tokenizer, file, config.perplexity_windows, config.window)
                          if config.perplexity_windows else
                          perplexity(model, tokenizer, file, config.perplexity_tokens, config.window))
        answered = [r for r in rows if r.label is not None][: config.accuracy_rows]
        if answered:
            stop = stop_ids(tokenizer, _generation_config(artifact.path))
            prompts = [chat_wrap(tokenizer, r.text, r.chat) for r in answered]
            longest = max(len(tokenizer(str(r.label), add_special_tokens=False)["input_ids"]) for r in answered)
            outputs = model.greedy(prompts, config.max_new_tokens or longest + 1, stop, tokenizer.pad_token_id or 0)
            answers = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
            result.update(TextGeneration().score(answered, answers, []))
            result["accuracy_rows"] = len(answered)
            result["examples"] = [{"prompt": r.text[-120:], "expected": r.label, "answer": a}
                                  for r, a in list(zip(answered, answers))[:3]]
        if settings.latency:
            prompt = _timing_prompt(tokenizer, config)
            result["latency"] = timing(artifact, prompt, config.new_tokens, settings.threads, config.timing_runs)
        result["rows"] = len(answered)
        return result


def _generation_config(path: Path) -> dict[str, Any]:
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if file.is_file():
            return json.loads(file.read_text())
    return {}


def _timing_prompt(tokenizer: Any, config: GenerationEvalConfig) -> list[int]:
    """A fixed prompt of exactly `prompt_tokens` tokens: repeated text, so that every artifact gets the same ids."""
    ids = list(tokenizer("The history of the city begins with a small settlement on the river. " * 64,
                         add_special_tokens=False)["input_ids"])
    while len(ids) < config.prompt_tokens:
        ids += ids
    return ids[: config.prompt_tokens]


def timing(artifact: Artifact, prompt: list[int], new_tokens: int, threads: int, runs: int) -> dict[str, Any]:
    """generation_timing in a fresh process: speed, and the peak RSS of that model alone."""
    cmd = [sys.executable, "-m", "compressor.evaluate.generation_timing",
           "onnxruntime" if format_named(artifact.format).onnxruntime else "torch", str(artifact.path),
           "--prompt", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens), "--threads", str(threads),
           "--runs", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {artifact.path.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_windows(tokenizer: Any, file: Path, tokens: int, window: int) -> list[list[int]]:
    """The token ids of the file's first `tokens` tokens, cut into `window`-token windows (a last window of
    fewer than 2 tokens is dropped): what perplexity scores, for benches that score elsewhere."""
    ids = list(tokenizer(file.read_text(encoding="utf-8")[: tokens * 12], add_special_tokens=False)["input_ids"])
    ids = ids[:tokens]
    return [c for c in (ids[s : s + window] for s in range(0, len(ids) - 1, window)) if len(c) >= 2]


def _window_sums(model: "_Model", chunks: list[list[int]]) -> tuple[list[tuple[float, int]], float, int]:
    """Each window's (summed NLL, scored tokens), and their totals."""
    sums = [model.window_nll(c) for c in chunks]
    return sums, sum(n for n, _ in sums), sum(c for _, c in sums)


def perplexity(model: "_Model", tokenizer: Any, file: Path, tokens: int, window: int) -> dict[str, Any]:
    """exp(mean negative log-likelihood) over the file's first `tokens` tokens, in windows of `window`."""
    import math

    chunks = first_windows(tokenizer, file, tokens, window)
    _, total, count = _window_sums(model, chunks)
    return {"perplexity": math.exp(total / count), "perplexity_tokens": sum(len(c) for c in chunks),
            "perplexity_window": window, "perplexity_file": file.name}


def spread_window_starts(tokens: int, window: int, count: int, leave_out: set[int] | frozenset[int] = frozenset()
                         ) -> list[int]:
    """Offsets of `count` whole `window`-token windows taken evenly from a text of `tokens` tokens (every
    window when there are fewer), skipping the offsets in `leave_out`."""
    free = [s for s in range(0, tokens - window + 1, window) if s not in leave_out]
    return free if count >= len(free) else [free[int(i * len(free) / count)] for i in range(count)]


def spread_windows(tokenizer: Any, file: Path, windows: int, window: int) -> tuple[list[list[int]], int]:
    """The token ids of `windows` windows spread evenly over the whole file (all of a file shorter than one
    window), and the file's token count: what spread_perplexity scores, for benches that score elsewhere."""
    ids = list(tokenizer(file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    return [ids[s : s + window] for s in spread_window_starts(len(ids), window, windows) or [0]], len(ids)


def spread_perplexity(model: "_Model", tokenizer: Any, file: Path, windows: int, window: int) -> dict[str, Any]:
    """exp(mean negative log-likelihood) over `windows` windows spread evenly over the whole file, with each
    window's summed NLL (`perplexity_window_nll`) so that a bench can tell the figure's sampling noise."""
    import math

    chunks, file_tokens = spread_windows(tokenizer, file, windows, window)
    sums, total, count = _window_sums(model, chunks)
    return {"perplexity": math.exp(total / count), "perplexity_tokens": count + len(chunks),
            "perplexity_window": window, "perplexity_file": file.name, "perplexity_windows": len(chunks),
            "perplexity_file_tokens": file_tokens, "perplexity_window_nll": [round(n, 4) for n, _ in sums]}


class _Model:
    """The artifact loaded for scoring: PyTorch for `hf`, compressor.bundle.device.generation_runtime for `onnx`."""

    def __init__(self, artifact: Artifact, threads: int):
        self.format = artifact.format
        if artifact.format == "hf":
            import torch

            from compressor.models.loading import load_torch_model

            torch.set_num_threads(threads)
            self.torch = load_torch_model(artifact.path, artifact.task, artifact.info.adapter)
        else:
            from compressor.bundle.device.generation_runtime import OnnxCausalLM

            self.onnx = OnnxCausalLM(artifact.model_file, threads=threads)

    def logits(self, ids: list[int]) -> Any:
        """Logits at every position of one sequence, as float32 numpy."""
        import numpy as np

        if self.format != "hf":
            arr = np.asarray([ids], np.int64)
            return self.onnx.forward(arr, np.ones_like(arr), self.onnx.empty_past(1))[0][0].astype(np.float32)
        import torch

        with torch.inference_mode():
            return self.torch(torch.tensor([ids])).logits[0].float().numpy()

    def window_nll(self, ids: list[int]) -> tuple[float, int]:
        import numpy as np

        from compressor.bundle.device.generation_runtime import nll_from_logits

        return nll_from_logits(self.logits(ids)[:-1], np.asarray(ids[1:]))

    def greedy(self, prompts: list[list[int]], max_new: int, stop: set[int], pad: int, batch: int = 16
               ) -> list[list[int]]:
        out: list[list[int]] = []
        if self.format != "hf" and "position_ids" not in self.onnx.input_names:
            batch = 1  # the graph derives positions itself (onnxruntime-genai's GQA): left padding would shift them
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            if self.format != "hf":
                out += self.onnx.greedy_batch(chunk, max_new, stop, pad)
                continue
            out += _torch_greedy(self.torch, chunk, max_new, stop, pad)
        return out


def _torch_greedy(model: Any, prompts: list[list[int]], max_new: int, stop: set[int], pad: int) -> list[list[int]]:
    """The same left-padded greedy loop as generation_runtime's, on PyTorch with its KV cache."""
    import torch

    from compressor.bundle.device.generation_runtime import take

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    with torch.inference_mode():
        for _ in range(max_new):
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            result = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                           use_cache=True, logits_to_keep=1)  # the last position's logits only
            past = result.past_key_values
            tokens = result.logits[:, -1].argmax(-1)
            if take(tokens.tolist(), out, done, stop):
                break
            ids = tokens[:, None]
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
    return out


#: Marks where the user's prompt goes when the chat template is rendered once, at bundle time.
_SENTINEL = "\u241fPROMPT\u241f"


def generation_spec(artifact: Artifact) -> dict[str, Any]:
    """How the device turns a prompt into token ids and when it stops: the chat template rendered once
    around a placeholder (predict.py has no jinja), the template itself with its special tokens (for a server's
    multi-message chats, rendered with jinja2), the stop ids and a default answer length."""
    from compressor.models.loading import load_tokenizer

    tokenizer = load_tokenizer(artifact.path)
    spec: dict[str, Any] = {"prompt_format": "{prompt}", "add_special_tokens": True,
                            "stop_ids": sorted(stop_ids(tokenizer, _generation_config(artifact.path))),
                            "pad_id": tokenizer.pad_token_id or 0, "max_new_tokens": 128}
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                             tokenize=False)
        before, _, after = text.partition(_SENTINEL)
        spec.update(prompt_format=before.replace("{", "{{").replace("}", "}}") + "{prompt}"
                    + after.replace("{", "{{").replace("}", "}}"), add_special_tokens=False,
                    chat_template=tokenizer.chat_template, bos_token=tokenizer.bos_token or "",
                    eos_token=tokenizer.eos_token or "")
    config = artifact.path / "config.json"
    model_config = json.loads(config.read_text()) if config.is_file() else {}
    spec["context_length"] = int(model_config.get("max_position_embeddings") or 2048)
    return spec
