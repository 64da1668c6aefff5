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


def main() -> int:
    """Time the models round by round and print the table."""
    from compressor.bundle.device.generation_runtime import OnnxCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    models = {path: OnnxCausalLM(path, threads=args.threads) for path in args.models}
    prompt = list(range(1000, 1000 + args.prompt))

    def decode_speed(lm: OnnxCausalLM) -> float:
        logits, cache = lm.prefill(prompt, args.prompt + args.tokens)
        start = time.perf_counter()
        for _ in range(args.tokens):
            logits = lm.decode(int(logits.argmax()), cache)
        return args.tokens / (time.perf_counter() - start)

    for lm in models.values():  # warm-up
        decode_speed(lm)
    speeds: dict[Path, list[float]] = {path: [] for path in models}
    for _ in range(args.rounds):
        for path, lm in models.items():
            speeds[path].append(decode_speed(lm))
    baseline = speeds[args.models[0]]
    first = max(baseline)
    print("| model | cache | best tok/s | × first (bests) | × first (median of rounds) | rounds |\n"
          "|---|---|---:|---:|---:|---|")
    for path, values in speeds.items():
        cache = "shared buffer" if models[path].share_buffer else "copied"
        # each round's ratio to the first model's time in the same round: a machine that slows for a
        # while slows both, which the ratio of two bests taken in different rounds does not see
        per_round = statistics.median(v / b for v, b in zip(values, baseline))
        print(f"| {path} | {cache} | {max(values):.1f} | {max(values) / first:.2f}× | {per_round:.2f}× | "
              f"{', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
