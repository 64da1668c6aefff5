"""Greedy generation and perplexity over an ONNX causal LM with a KV cache: numpy and onnxruntime only.

This file runs on edge devices (a generation bundle copies it beside predict.py) and inside
compressor (the text-generation evaluator, export-onnx's parity check), so that what is measured
is what ships. The model is the layout onnxruntime-genai's model builder writes (and Optimum's
`text-generation-with-past` export): inputs `input_ids`, `attention_mask` (past + new), optionally
`position_ids`, and `past_key_values.N.key/value` of shape (batch, kv_heads, past, head_dim); outputs
`logits` and `present.N.key/value`.

Where the genai_config.json beside the model says `past_present_share_buffer` (onnxruntime-genai's
builder graphs, whose GroupQueryAttention writes the new positions into the cache it reads), one-sequence
greedy decoding (`prefill`/`decode`, `stream`) keeps each layer's cache in one preallocated buffer bound
as both past input and present output, as onnxruntime-genai's runtime does, instead of copying the whole
cache into a new array every token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxCausalLM:
    """A KV-cached causal LM in one onnxruntime session."""

    def __init__(self, model: str | Path | bytes, threads: int = 0, session: Any = None):
        import onnxruntime as ort

        if session is None:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                           providers=["CPUExecutionProvider"])
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if "input_ids" not in inputs or not self.past_names:
            raise ValueError("the model has no input_ids or no past_key_values inputs: export it with a KV cache "
                             "(text-generation-with-past)")
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = (_dim(first.shape[1], model, "num_key_value_heads"),
                                        _dim(first.shape[3], model, "head_dim"))
        self.kv_dtype = _DTYPES.get(first.type, np.float32)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.output_names = ["logits", *self.present_names]
        self.share_buffer = bool(_genai_search(model).get("past_present_share_buffer", False))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A cache with no positions yet."""
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def feeds(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The session's inputs for `ids` (batch, new) after `past`; `mask` covers past and new positions."""
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if "position_ids" in self.input_names:
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]
            feeds["position_ids"] = positions.astype(np.int64)
        feeds.update(zip(self.past_names, past))
        return feeds

    def forward(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """Logits for `ids` (batch, new) after `past`; `mask` covers past and new positions."""
        out = self.session.run(self.output_names, self.feeds(ids, mask, past))
        return out[0], out[1:]

    def prefill(self, prompt: list[int], capacity: int) -> tuple[np.ndarray, "KVCache"]:
        """The last position's logits after `prompt` (one sequence) and the cache to `decode` from, with room
        for `capacity` positions in all (prompt included) where the cache is a shared buffer."""
        ids = np.asarray([prompt], np.int64)
        cache = KVCache(mask=np.ones_like(ids))
        if self.share_buffer:
            import onnxruntime as ort

            shape = (1, self.kv_heads, max(capacity, len(prompt)), self.head_dim)
            cache.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype)) for _ in self.past_names]
            return self._bound_run(ids, cache), cache
        logits, cache.past = self.forward(ids, cache.mask, self.empty_past(1))
        return logits[0, -1], cache

    def decode(self, token: int, cache: "KVCache") -> np.ndarray:
        """The logits after one more token; the cache grows (in place where it is a shared buffer)."""
        ids = np.asarray([[token]], np.int64)
        cache.mask = np.ones((1, cache.mask.shape[1] + 1), np.int64)
        if cache.buffers is not None:
            return self._bound_run(ids, cache)
        logits, cache.past = self.forward(ids, cache.mask, cache.past)
        return logits[0, -1]

    def _bound_run(self, ids: np.ndarray, cache: "KVCache") -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in self.feeds(ids, cache.mask, []).items():
            binding.bind_cpu_input(name, value)
        for past, present, buffer in zip(self.past_names, self.present_names, cache.buffers or []):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)  # the same memory: the new positions land in place
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()[0, -1]  # outputs come back in the order they were bound

    def stream(self, prompt: list[int], max_new_tokens: int, stop: set[int]) -> Iterator[int]:
        """Greedy tokens after `prompt`, one at a time, until a `stop` token (not yielded) or the limit."""
        logits, cache = self.prefill(prompt, len(prompt) + max_new_tokens)
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            if token in stop:
                return
            yield token
            logits = self.decode(token, cache)

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: int, stop: set[int], pad_id: int = 0
                     ) -> list[list[int]]:
        """Greedy completions of several prompts at once (left-padded), each cut at its first stop token."""
        width = max(len(p) for p in prompts)
        ids = np.asarray([[pad_id] * (width - len(p)) + list(p) for p in prompts], np.int64)
        mask = np.asarray([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
        logits, past = self.forward(ids, mask, self.empty_past(len(prompts)))
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new_tokens):
            tokens = logits[:, -1].argmax(-1)
            if take(tokens.tolist(), out, done, stop):
                break
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            logits, past = self.forward(tokens[:, None].astype(np.int64), mask, past)
        return out

    def window_nll(self, ids: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood of ids[1:] given the ones before, and how many tokens that is."""
        arr = np.asarray([ids], np.int64)
        logits, _ = self.forward(arr, np.ones_like(arr), self.empty_past(1))
        return nll_from_logits(logits[0, :-1], arr[0, 1:])


class SlotCache:
    """The KV caches of up to `slots` sequences in one batch, for continuous batching: each layer's cache is one
    (slots, kv_heads, capacity, head_dim) buffer that the graph writes in place (a `past_present_share_buffer`
    graph), each sequence a row filled from position 0 (right padding: the graph's GroupQueryAttention takes each
    row's length from its attention mask). Rows are kept contiguous, so one decode step runs the first `len(self)`
    rows; a sequence that finishes gives its row to the last one at once."""

    def __init__(self, lm: OnnxCausalLM, slots: int, capacity: int):
        if not lm.share_buffer:
            raise ValueError("batched decoding needs a graph whose cache is a shared buffer (onnxruntime-genai's "
                             "builder writes one)")
        self.lm, self.slots, self.capacity = lm, slots, capacity
        shape = (slots, lm.kv_heads, capacity, lm.head_dim)
        self.buffers = [np.zeros(shape, lm.kv_dtype) for _ in lm.past_names]
        self.lengths: list[int] = []
        self._bound: tuple[int, Any, list[Any]] | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, prompt: list[int]) -> np.ndarray:
        """Prefill `prompt` into the next free row; the last position's logits. The prompt runs alone (its own
        one-row buffer), then its cache is copied into the row."""
        if len(self.lengths) >= self.slots:
            raise ValueError("no free slot")
        if len(prompt) >= self.capacity:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in a cache of {self.capacity}")
        logits, cache = self.lm.prefill(prompt, len(prompt))
        row = len(self.lengths)
        for buffer, own in zip(self.buffers, cache.buffers or []):
            buffer[row, :, : len(prompt)] = own.numpy()[0, :, : len(prompt)]
        self.lengths.append(len(prompt))
        return logits

    def step(self, tokens: list[int]) -> np.ndarray:
        """One decode step of every row (`tokens[i]` is row i's next input); logits (rows, vocab)."""
        rows = len(self.lengths)
        if any(n + 1 > self.capacity for n in self.lengths):
            raise ValueError("a sequence reached the cache's capacity")
        ids = np.asarray(tokens, np.int64).reshape(rows, 1)
        width = max(self.lengths) + 1
        mask = (np.arange(width)[None, :] <= np.asarray(self.lengths)[:, None]).astype(np.int64)
        binding = self._binding(rows)
        for name, value in self.lm.feeds(ids, mask, []).items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        self.lm.session.run_with_iobinding(binding)
        self.lengths = [n + 1 for n in self.lengths]
        return binding.get_outputs()[-1].numpy()[:, -1]

    def _binding(self, rows: int) -> Any:
        """An IOBinding with the first `rows` rows of every cache buffer bound as both past and present (the
        graph writes the new positions in place); kept while the number of rows stays the same."""
        import onnxruntime as ort

        if self._bound is None or self._bound[0] != rows:
            binding = self.lm.session.io_binding()
            views = [ort.OrtValue.ortvalue_from_numpy(b[:rows]) for b in self.buffers]  # share the rows' memory
            for past, present, view in zip(self.lm.past_names, self.lm.present_names, views):
                binding.bind_ortvalue_input(past, view)
                binding.bind_ortvalue_output(present, view)
            self._bound = (rows, binding, views)
        return self._bound[1]

    def remove(self, row: int) -> None:
        """Free `row`: the last row moves into it (its cache copied), so that rows stay contiguous."""
        last = len(self.lengths) - 1
        if row != last:
            n = self.lengths[last]
            for buffer in self.buffers:
                buffer[row, :, :n] = buffer[last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()


class KVCache:
    """One sequence's KV cache: growing numpy arrays, or fixed buffers that the graph writes in place."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask
        self.past: list[np.ndarray] = []
        self.buffers: list[Any] | None = None


def _beside(model: Any, name: str) -> dict[str, Any]:
    """The JSON file `name` beside the model file, parsed; empty when the model is bytes or there is none."""
    import json

    file = Path(model).parent / name if isinstance(model, (str, Path)) else None
    return json.loads(file.read_text()) if file is not None and file.is_file() else {}


def _genai_search(model: Any) -> dict[str, Any]:
    """The `search` settings of the genai_config.json beside the model file, if there is one."""
    return _beside(model, "genai_config.json").get("search", {})


def _dim(value: Any, model: Any, key: str) -> int:
    """A cache dimension: from the graph, or, where the graph leaves it symbolic (onnxruntime-genai's
    builder writes `kv_cache_dim`), from the config.json or genai_config.json beside the model file."""
    if isinstance(value, int):
        return value
    for name in ("config.json", "genai_config.json"):
        config = _beside(model, name)
        config = config.get("model", {}).get("decoder", config) if name == "genai_config.json" else config
        found = {"head_dim": config.get("head_dim") or config.get("head_size")
                 or (config.get("hidden_size") // config.get("num_attention_heads")
                     if config.get("hidden_size") and config.get("num_attention_heads") else None),
                 "num_key_value_heads": config.get("num_key_value_heads")}.get(key)
        if found:
            return int(found)
    raise ValueError(f"the model leaves {key} symbolic ({value!r}) and no config.json beside it gives it")


def take(tokens: list[int], out: list[list[int]], done: list[bool], stop: set[int]) -> bool:
    """Append each row's new token to its answer unless the row has stopped; whether every row has."""
    for b, token in enumerate(tokens):
        if not done[b]:
            if token in stop:
                done[b] = True
            else:
                out[b].append(token)
    return all(done)


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed -log p(target) under softmax(logits), in float64, and the number of targets."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float((log_z - logits[np.arange(len(targets)), targets]).sum()), int(len(targets))
