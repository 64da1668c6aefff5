"""Perplexity on many windows spread over a whole text file, and how much that figure moves with the windows.

    python bench/perplexity_spread.py ../shared/data/wikitext-2/test.txt MODEL_DIR [MODEL_DIR ...]
        [--windows 128] [--window 512] [--calibration-windows 8] [--seed 0]
    python bench/perplexity_spread.py ../shared/data/wikitext-2/test.txt FP32_DIR INT4_DIR --noise 32,64,128,256

Without --noise: `--windows` windows of `--window` tokens taken evenly from the whole file (what a recipe's
`evaluate.task.perplexity_windows` scores), with the same model code the recipe's evaluator uses, one
Markdown row per model, the first model as the baseline.

With --noise N,...: every whole window of the file is scored once per model. For each N, the file's windows
fall into k = windows // N disjoint sets of N evenly spread windows (set p: every k-th window from the p-th);
the bench prints each model's Δ from the first model on every set, and their spread (standard deviation
across sets). That spread is the noise of an N-window figure: how far it moves when the same amount of text
is taken from other places of the same file. A paired bootstrap over windows (2,000 resamples of N
windows) gives a second estimate. The evaluator is deterministic on one machine: repeating a run repeats
the figure, so this sampling noise is the figure's whole run-to-run noise.

When the file is a GPTQ calibration_text, pass the step's calibration_windows and the recipe's seed: the
windows GPTQ read are left out. Asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path


def main() -> int:
    """Score every model on the same spread windows (or on all of them, with --noise)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("models", type=Path, nargs="+", help="artifact directories (hf or onnx)")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--noise", default="", help="comma-separated window counts whose noise to measure")
    parser.add_argument("--calibration-windows", type=int, default=0,
                        help="leave out the windows a quantize-onnx step with this many calibration_windows read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_tokenizer
    from compressor.plugins.quantize_onnx import calibration_window_starts
    from compressor.tasks.text_generation import _Model, spread_window_starts

    ids = load_tokenizer(args.models[0])(args.file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    read = set(calibration_window_starts(len(ids), args.window, args.calibration_windows, args.seed)
               if args.calibration_windows else ())
    sizes = [int(n) for n in args.noise.split(",") if n]
    picked = spread_window_starts(len(ids), args.window, 10**9 if sizes else args.windows, read)
    print(f"{args.file.name}: {len(ids)} tokens; {len(picked)} windows of {args.window}"
          f"{' (every whole window)' if sizes else ' spread over it'}"
          f"{f'; {len(read)} calibration windows left out' if read else ''}\n")
    scores: list[list[float]] = []
    if not sizes:
        print("| model | perplexity | Δ | tokens scored |\n|---|---:|---:|---:|")
    for path in args.models:
        model = _Model(Artifact.load(path), args.threads)
        nll = [model.window_nll(list(ids[s : s + args.window]))[0] for s in picked]
        scores.append(nll)
        value, base = math.exp(sum(nll) / (len(nll) * (args.window - 1))), math.exp(sum(scores[0]) / (
            len(nll) * (args.window - 1)))
        print(f"| {path} | {value:.3f} | {100 * (value / base - 1):+.2f}% | {len(nll) * (args.window - 1)} |"
              if not sizes else f"{path}: perplexity {value:.3f} over every window ({100 * (value / base - 1):+.2f}%)",
              flush=True)
    if sizes:
        noise_tables(scores, args.models, sizes, args.window - 1)
    return 0


def noise_tables(scores: list[list[float]], models: list[Path], sizes: list[int], per_window: int) -> None:
    """For each window count: every model's Δ from the first on each disjoint spread set, and their spread."""
    import numpy as np

    nll = np.asarray(scores)  # models × windows, summed NLL per window
    rng = np.random.default_rng(0)
    for n in sizes:
        k = nll.shape[1] // n
        if k < 2:
            print(f"\n{n} windows: the file has fewer than two disjoint sets of them")
            continue
        print(f"\n### {n} windows ({n * per_window:,} tokens): {k} disjoint spread sets\n")
        print("| model | Δ per set | mean | sd across sets | bootstrap sd |\n|---|---|---:|---:|---:|")
        for m in range(1, len(models)):
            deltas = [100 * (math.exp((nll[m, p::k][:n] - nll[0, p::k][:n]).sum() / (n * per_window)) - 1)
                      for p in range(k)]
            draws = rng.integers(0, nll.shape[1], size=(2000, n))
            boot = 100 * (np.exp((nll[m][draws] - nll[0][draws]).sum(1) / (n * per_window)) - 1)
            print(f"| {models[m]} | {', '.join(f'{d:+.2f}%' for d in deltas)} | {np.mean(deltas):+.2f}% | "
                  f"{np.std(deltas, ddof=1):.2f} | {boot.std(ddof=1):.2f} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
