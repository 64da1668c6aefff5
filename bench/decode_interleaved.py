"""Decode speed of several ONNX causal LMs, interleaved in one process so that a slow minute of the
machine falls on every model alike.

    python bench/decode_interleaved.py A/model.onnx B/model.onnx ... [--rounds 5] [--prompt 128] [--tokens 128]

Each round times every model in turn: a `--prompt`-token prompt, then `--tokens` greedy steps through
compressor/bundle/device/generation_runtime.py (the loop the recipe measures with and the bundle ships, with its shared
cache buffer where the model's genai_config.json asks for one). Prints each model's best round and every
round, the ratio of each best to the first model's, and the median over rounds of each round's ratio to
the first model's in that round (the steadier figure on a machine whose speed drifts). Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def interleaved_speeds(paths: list[Path], rounds: int, prompt_tokens: int, new_tokens: int,
                       threads: int) -> tuple[dict[Path, list[float]], dict[Path, bool]]:
    """Decode tokens/s of every model in every round (one warm-up each, then round after round, every model in
    turn: a `prompt_tokens` prompt, then `new_tokens` greedy steps), and whether each shares its cache buffer."""
    from compressor.bundle.device.generation_runtime import OnnxCausalLM

    models = {path: OnnxCausalLM(path, threads=threads) for path in paths}
    prompt = list(range(1000, 1000 + prompt_tokens))

    def decode_speed(lm: OnnxCausalLM) -> float:
        logits, cache = lm.prefill(prompt, prompt_tokens + new_tokens)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = lm.decode(int(logits.argmax()), cache)
        return new_tokens / (time.perf_counter() - start)

    for lm in models.values():  # warm-up
        decode_speed(lm)
    speeds: dict[Path, list[float]] = {path: [] for path in models}
    for _ in range(rounds):
        for path, lm in models.items():
            speeds[path].append(decode_speed(lm))
    return speeds, {path: lm.share_buffer for path, lm in models.items()}


def median_ratio(values: list[float], baseline: list[float]) -> float:
    """The median over rounds of each round's ratio to the baseline's speed in the same round: a machine that
    slows for a while slows both, which the ratio of two bests taken in different rounds does not see."""
    return statistics.median(v / b for v, b in zip(values, baseline))


def main() -> int:
    """Time the models round by round and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    speeds, shared = interleaved_speeds(args.models, args.rounds, args.prompt, args.tokens, args.threads)
    baseline = speeds[args.models[0]]
    first = max(baseline)
    print("| model | cache | best tok/s | × first (bests) | × first (median of rounds) | rounds |\n"
          "|---|---|---:|---:|---:|---|")
    for path, values in speeds.items():
        cache = "shared buffer" if shared[path] else "copied"
        print(f"| {path} | {cache} | {max(values):.1f} | {max(values) / first:.2f}× | "
              f"{median_ratio(values, baseline):.2f}× | {', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
