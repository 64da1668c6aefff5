"""Perplexity on many windows spread over a whole text file: a less noisy figure than a recipe's first tokens.

    python bench/perplexity_spread.py ../shared/data/wikitext-2/test.txt MODEL_DIR [MODEL_DIR ...]
        [--windows 128] [--window 512] [--calibration-windows 8] [--seed 0]

A recipe reports perplexity on the first `perplexity_tokens` tokens of its file (4,096 for the LLM
recipes, as the issue's peer figures were taken). That is one stretch of text: on SmolLM2 two int4
models 0.3% apart on 32k tokens of WikiText-2 valid were 0.7% apart the other way on test's first 4,096.
This script scores `--windows` windows of `--window` tokens taken evenly from the whole file, with the
same model code the recipe's evaluator uses. When the file is a GPTQ calibration_text, pass the step's
calibration_windows and the recipe's seed: the windows GPTQ read are left out. Asserts nothing; prints
one Markdown row per model, the first model as the baseline.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path


def main() -> int:
    """Score every model on the same spread windows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("models", type=Path, nargs="+", help="artifact directories (hf or onnx)")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-windows", type=int, default=0,
                        help="leave out the windows a quantize-onnx step with this many calibration_windows read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_tokenizer
    from compressor.plugins.quantize_onnx import calibration_window_starts
    from compressor.tasks.text_generation import _Model

    ids = load_tokenizer(args.models[0])(args.file.read_text(encoding="utf-8"))["input_ids"]
    starts = range(0, len(ids) - args.window + 1, args.window)
    read = set(calibration_window_starts(len(ids), args.window, args.calibration_windows, args.seed)
               if args.calibration_windows else ())
    free = [s for s in starts if s not in read]
    picked = [free[int(i * len(free) / args.windows)] for i in range(min(args.windows, len(free)))]
    print(f"{args.file.name}: {len(ids)} tokens; {len(picked)} windows of {args.window} spread over it"
          f"{f'; {len(read)} calibration windows left out' if read else ''}\n")
    print("| model | perplexity | Δ | tokens scored |\n|---|---:|---:|---:|")
    base = None
    for path in args.models:
        model = _Model(Artifact.load(path), args.threads)
        total, count = 0.0, 0
        for s in picked:
            nll, n = model.window_nll(list(ids[s : s + args.window]))
            total, count = total + nll, count + n
        value = math.exp(total / count)
        base = base or value
        print(f"| {path} | {value:.3f} | {100 * (value / base - 1):+.2f}% | {count} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
