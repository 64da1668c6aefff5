"""Serving a generation bundle: OpenAI's /v1/completions and /v1/chat/completions over continuous batching.

Requests share decode steps: a scheduler thread keeps up to `--max-num-seqs` sequences in one batched KV cache
(generation_runtime.SlotCache), admits a waiting request between steps (its prompt prefilled alone), advances
every sequence by one token per forward pass, and frees a sequence's row as soon as it ends, stops on a stop
string, or its client goes away. A graph without a shared cache buffer decodes one sequence at a time.
Copied into generation bundles beside serve.py; numpy, onnxruntime, tokenizers, fastapi and jinja2 only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if "predict" in sys.modules:  # inside a bundle: the copies beside this file
    from generation_runtime import SlotCache
    from serve import ApiError
else:
    from compressor.bundle.device.generation_runtime import SlotCache
    from compressor.bundle.device.server import ApiError

#: The longest cache a sequence gets unless --max-model-len says otherwise (memory grows with it per slot).
DEFAULT_MAX_MODEL_LEN = 2048


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1, description="One choice per request.")
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-turn token (as vLLM's "
                                                        "extension of the same name).")


class CompletionRequest(_Request):
    """OpenAI's completions request (the fields this server reads; others are ignored)."""

    prompt: str | list[str]


class Message(BaseModel):
    """One chat message; content as text or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    """OpenAI's chat completions request."""

    messages: list[Message] = Field(min_length=1)


class Generation:
    """One request's generation: what the scheduler reads, and the queue its tokens arrive on."""

    def __init__(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                 loop: asyncio.AbstractEventLoop, ignore_eos: bool = False):
        self.prompt, self.max_tokens, self.temperature, self.top_p = prompt, max_tokens, temperature, top_p
        self.ignore_eos = ignore_eos
        self.rng = np.random.default_rng(seed)
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.generated = 0
        self.next_token = 0

    def emit(self, item: Any) -> None:
        """Hand a token id, or ("end", finish_reason), to the request's handler (thread-safe)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token: arg-max at temperature 0, else sampled from softmax(logits / temperature) within top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))


class _OneSequence:
    """The SlotCache interface over one sequence's own cache, for graphs without a shared cache buffer."""

    def __init__(self, lm: Any, capacity: int):
        self.lm, self.capacity, self.slots = lm, capacity, 1
        self.cache: Any = None
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, prompt: list[int]) -> np.ndarray:
        logits, self.cache = self.lm.prefill(prompt, self.capacity)
        self.lengths = [len(prompt)]
        return logits

    def step(self, tokens: list[int]) -> np.ndarray:
        self.lengths = [self.lengths[0] + 1]
        return self.lm.decode(tokens[0], self.cache)[None]

    def remove(self, row: int) -> None:
        self.cache, self.lengths = None, []


class Scheduler:
    """Continuous batching over the bundle's KV-cache runtime, in a thread of its own."""

    def __init__(self, answers: Any, server: Any):
        self.server, self.answers = server, answers
        lm = answers.lm
        context = int(answers.generation.get("context_length") or DEFAULT_MAX_MODEL_LEN)
        self.capacity = min(server.options.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN), context)
        self.cache = SlotCache(lm, max(1, server.options.max_num_seqs), self.capacity) if lm.share_buffer \
            else _OneSequence(lm, self.capacity)
        self.stop_ids = set(answers.generation["stop_ids"])
        self.waiting: collections.deque[Generation] = collections.deque()
        self.active: list[Generation] = []  # active[i] holds row i of the cache
        self.condition = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self.thread.start()

    def submit(self, generation: Generation) -> None:
        """Queue a generation; ApiError 429 when the queue is full."""
        with self.condition:
            if len(self.waiting) >= self.server.options.max_queue:
                raise ApiError(429, f"the queue is full ({len(self.waiting)} requests waiting); retry shortly",
                               code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(generation)
            self.server.metrics.queue.set(len(self.waiting))
            self.condition.notify()

    def wake(self) -> None:
        """Look at the requests again (one was cancelled)."""
        with self.condition:
            self.condition.notify()

    def stop(self) -> None:
        """End the thread (the server shuts down)."""
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.active:
                    self.condition.wait()
                if self.stopped:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._step()
            except Exception as exc:  # a model failure ends the requests in flight, not the server
                for generation in [*self.active, *self.waiting]:
                    generation.emit(("error", f"{type(exc).__name__}: {exc}"))
                self.active, self.waiting = [], collections.deque()
                self.cache.lengths = []
            self.server.metrics.sequences.set(len(self.active))

    def _admit(self) -> None:
        while len(self.active) < self.cache.slots:
            with self.condition:
                if not self.waiting:
                    return
                generation = self.waiting.popleft()
                self.server.metrics.queue.set(len(self.waiting))
            if generation.cancelled:
                continue
            logits = self.cache.add(generation.prompt)
            self.active.append(generation)
            self.server.metrics.batch.observe(1)
            if self._take(generation, logits):
                self._free(len(self.active) - 1)

    def _step(self) -> None:
        full = [i for i, n in enumerate(self.cache.lengths) if n + 1 > self.capacity]
        for i in sorted(full, reverse=True):
            self.active[i].emit(("end", "length"))
            self._free(i)
        if not self.active:
            return
        logits = self.cache.step([g.next_token for g in self.active])
        self.server.metrics.batch.observe(len(self.active))
        done = [i for i, g in enumerate(self.active) if self._take(g, logits[i])]
        for i in sorted(done, reverse=True):
            self._free(i)

    def _take(self, generation: Generation, logits: np.ndarray) -> bool:
        """Pick and hand on the next token; whether the generation ended."""
        if generation.cancelled:
            return True
        token = pick(logits, generation.temperature, generation.top_p, generation.rng)
        if token in self.stop_ids and not generation.ignore_eos:
            generation.emit(("end", "stop"))
            return True
        generation.generated += 1
        generation.next_token = token
        generation.emit(token)
        self.server.metrics.tokens.inc()
        if generation.generated >= generation.max_tokens:
            generation.emit(("end", "length"))
            return True
        return False

    def _drop_cancelled(self) -> None:
        for i in sorted((i for i, g in enumerate(self.active) if g.cancelled), reverse=True):
            self._free(i)

    def _free(self, row: int) -> None:
        """Give row `row` back (the last row moves into it, in the cache and here)."""
        self.cache.remove(row)
        self.active[row] = self.active[-1]
        self.active.pop()


class TextStream:
    """Token ids to text pieces: whole characters only, and text held back while it may begin a stop string."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    def feed(self, token: int) -> str:
        """The new text after `token` (possibly empty); sets `stopped` when a stop string appeared."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        for stop in self.stops:
            at = text.find(stop, max(0, self.shown - len(stop)))
            if at >= 0:
                self.stopped = True
                return self._advance(text[:at])
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._advance(text[: len(text) - hold] if hold else text)

    def finish(self) -> str:
        """What was held back, at the end."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd"))

    def _advance(self, text: str) -> str:
        piece = text[self.shown:] if len(text) > self.shown else ""
        self.shown = max(self.shown, len(text))
        return piece


def render_chat(generation: dict[str, Any], messages: list[Message]) -> tuple[str, bool]:
    """The prompt text of a chat, through the model's chat template (jinja2, sandboxed, as transformers renders
    it), and whether the tokenizer should add special tokens. Without a template: the last user message in the
    bundle's prompt format."""
    template = generation.get("chat_template")
    if not template:
        last = next((m.text() for m in reversed(messages) if m.role == "user"), messages[-1].text())
        return generation["prompt_format"].format(prompt=last), generation["add_special_tokens"]
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ApiError(400, f"the chat template refused the messages: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    text = env.from_string(template).render(messages=[{"role": m.role, "content": m.text()} for m in messages],
                                            add_generation_prompt=True, bos_token=generation.get("bos_token", ""),
                                            eos_token=generation.get("eos_token", ""))
    return text, False


def routes(app: Any, server: Any) -> None:
    """POST /v1/completions and /v1/chat/completions."""

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt[:1])
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise ApiError(400, "give one prompt per request", param="prompt")
        return await _respond(server, body, prompt, True, "text_completion", default_tokens=16)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        server.require_ready()
        text, special = render_chat(server.predictor.answers.generation, body.messages)
        return await _respond(server, body, text, special, "chat.completion", default_tokens=None)


async def generate(server: Any, text: str, special: bool, max_tokens: int | None) -> tuple[str, str]:
    """Greedy text for one prompt through the scheduler: (answer, finish_reason); for KServe's infer."""
    body = _Request(max_tokens=max_tokens, temperature=0)
    response = await _respond(server, body, text, special, "text_completion", default_tokens=max_tokens)
    return response["choices"][0]["text"], response["choices"][0]["finish_reason"]


async def _respond(server: Any, body: _Request, text: str, special: bool, kind: str,
                   default_tokens: int | None) -> Any:
    """Tokenize, check the length, queue the generation, and answer it whole or as server-sent events."""
    from fastapi.responses import StreamingResponse

    server.require_ready()
    server.check_model(body.model)
    answers = server.predictor.answers
    scheduler: Scheduler = answers.scheduler
    prompt = answers.tokenizer.encode(text, add_special_tokens=special).ids
    room = scheduler.capacity - len(prompt)
    wanted = body.max_completion_tokens or body.max_tokens
    if room < 1 or (wanted and wanted > room):
        raise ApiError(400, f"this model's maximum context length is {scheduler.capacity} tokens; the prompt has "
                            f"{len(prompt)}" + (f" and max_tokens asks for {wanted} more" if wanted else ""),
                       param="max_tokens" if wanted and room >= 1 else "messages" if kind != "text_completion"
                       else "prompt", code="context_length_exceeded")
    limit = wanted or min(room, default_tokens or room)
    generation = Generation(prompt, limit, body.temperature, body.top_p, body.seed, asyncio.get_running_loop(),
                            body.ignore_eos)
    scheduler.submit(generation)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    meta = {"id": f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": server.name}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_events(scheduler, generation, answers.tokenizer, stops, kind, meta, include_usage),
                                 media_type="text/event-stream")
    pieces, reason = [], "length"
    try:
        async for piece, end in _pieces(scheduler, generation, answers.tokenizer, stops):
            pieces.append(piece)
            reason = end or reason
    finally:
        generation.cancelled = True
        scheduler.wake()
    content = "".join(pieces)
    choice = {"index": 0, "text": content} if kind == "text_completion" else \
        {"index": 0, "message": {"role": "assistant", "content": content}}
    return {**meta, "object": kind, "choices": [{**choice, "logprobs": None, "finish_reason": reason}],
            "usage": _usage(generation)}


async def _pieces(scheduler: Scheduler, generation: Generation, tokenizer: Any, stops: list[str]) -> Any:
    """(text piece, finish_reason or None) as tokens arrive; the last has the finish reason."""
    stream = TextStream(tokenizer, stops)
    while True:
        item = await generation.queue.get()
        if isinstance(item, tuple):
            if item[0] == "error":
                raise ApiError(500, f"generation failed: {item[1]}")
            yield stream.finish(), item[1]
            return
        piece = stream.feed(item)
        if stream.stopped:
            generation.cancelled = True
            scheduler.wake()
            yield piece, "stop"
            return
        if piece:
            yield piece, None


async def _events(scheduler: Scheduler, generation: Generation, tokenizer: Any, stops: list[str], kind: str,
                  meta: dict[str, Any], include_usage: bool) -> Any:
    """Server-sent events in OpenAI's stream format, ending with `data: [DONE]`; a client that goes away
    cancels the generation, which frees its slot at the next step."""
    chunk = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

    def event(choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> str:
        body = {**meta, "object": chunk, "choices": [choice] if choice else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def piece_choice(text: str, reason: str | None) -> dict[str, Any]:
        if kind == "text_completion":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}

    try:
        if kind != "text_completion":
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        try:
            async for text, reason in _pieces(scheduler, generation, tokenizer, stops):
                if reason is None:
                    yield event(piece_choice(text, None))
                else:
                    if text:
                        yield event(piece_choice(text, None))
                    yield event(piece_choice("", reason))
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        if include_usage:
            yield event(None, _usage(generation))
        yield "data: [DONE]\n\n"
    finally:
        generation.cancelled = True
        scheduler.wake()


def _usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": len(generation.prompt), "completion_tokens": generation.generated,
            "total_tokens": len(generation.prompt) + generation.generated}

