"""An LLM recipe's answer accuracy on every eval row, for the given artifacts: less noisy than the first 200.

    python bench/answers_all_rows.py recipes/smollm2-sst2-int4.yaml RUN_DIR/artifacts/02-export-onnx \
        RUN_DIR/artifacts/03-quantize-onnx

(RUN_DIR: the run directory of that recipe, under runs/.)

The recipe's evaluator (greedy answers, exact match) on all of `data.eval` (872 SST-2 dev rows), where the
recipe's report reads `accuracy_rows` of them. Reporting only: nothing is chosen on these rows. Asserts
nothing; prints one Markdown row per artifact.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main() -> int:
    """Score every artifact on every eval row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from compressor.models.artifact import Artifact
    from compressor.host import build_host
    from compressor.recipe.plan import build_plan
    from compressor.tasks.text_generation import GenerationEvaluator

    rows = build_plan(args.recipe, build_host()).data.load("eval")

    class Settings:  # what the evaluator reads: every row, no perplexity, no timing
        threads = args.threads
        latency = False
        task = {"accuracy_rows": len(rows)}

    print(f"| artifact | accuracy on all {len(rows)} eval rows |\n|---|---:|")
    for path in args.artifacts:
        result = GenerationEvaluator().evaluate(Artifact.load(path), rows, Settings())
        print(f"| {path} | {result['accuracy']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
