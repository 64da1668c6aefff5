"""Generation speed and memory of one artifact, measured in a fresh process of its own.

    python -m compressor.evaluate.generation_timing RUNTIME PATH --prompt-tokens 128 --new-tokens 128 --threads 2

Prints one JSON object: time to first token (the prompt's prefill, batch 1), decode tokens/s, the
median and p90 time of one decode step, and the peak RSS of this process (getrusage), which counts
this model only, not the host process that measured everything else. RUNTIME `onnxruntime` runs PATH's
model.onnx on
compressor.bundle.device.generation_runtime (numpy + onnxruntime, as a bundle does: its cache is a shared buffer
where the graph asks for one); `torch` loads PATH as a transformers model.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable


def _steps_onnx(path: Path, threads: int, capacity: int) -> tuple[Callable, Callable]:
    from compressor.bundle.device.generation_runtime import OnnxCausalLM

    model = OnnxCausalLM(path / "model.onnx", threads=threads)

    def prefill(ids: list[int]) -> Any:
        logits, cache = model.prefill(ids, capacity)
        return int(logits.argmax()), cache

    def step(token: int, cache: Any) -> Any:
        return int(model.decode(token, cache).argmax()), cache

    return prefill, step


def _steps_torch(path: Path, threads: int, capacity: int) -> tuple[Callable, Callable]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True).eval()

    def prefill(ids: list[int]) -> Any:
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def step(token: int, past: Any) -> Any:
        with torch.inference_mode():
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    return prefill, step


def measure(runtime: str, path: Path, prompt: list[int], new_tokens: int, threads: int, runs: int) -> dict[str, Any]:
    """Best-of-`runs` time to first token and decode speed, after one untimed warm-up run."""
    prefill, step = (_steps_onnx if runtime == "onnxruntime" else _steps_torch)(path, threads,
                                                                                 len(prompt) + new_tokens)
    ttfts, steps = [], []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        token, state = prefill(prompt)
        ttft = time.perf_counter() - t0
        times = []
        for _ in range(new_tokens):
            t1 = time.perf_counter()
            token, state = step(token, state)
            times.append(time.perf_counter() - t1)
        if run:  # the first run warms up allocators and caches
            ttfts.append(ttft)
            steps.append(times)
    decode = min(sum(t) for t in steps)
    flat = sorted(t for times in steps for t in times)
    return {"ttft_ms": 1000 * min(ttfts), "decode_tokens_per_s": new_tokens / decode,
            "p50_ms": 1000 * statistics.median(flat), "p90_ms": 1000 * flat[int(0.9 * (len(flat) - 1))],
            "throughput": new_tokens / decode, "throughput_batch": 1, "prompt_tokens": len(prompt),
            "new_tokens": new_tokens, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This program's peak resident memory: VmHWM of its own address space on Linux (getrusage's maxrss
    keeps the parent's peak across fork and exec), else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def main(argv: list[str]) -> int:
    """Command line: measure one artifact and print JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime", choices=("onnxruntime", "torch"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--prompt", required=True, help="comma-separated prompt token ids")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    prompt = [int(t) for t in args.prompt.split(",")]
    print(json.dumps(measure(args.runtime, args.path, prompt, args.new_tokens, args.threads, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
