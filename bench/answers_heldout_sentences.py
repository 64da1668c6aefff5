"""An LLM recipe's answer accuracy on held-out SST-2 train *sentences*: a tuning split that looks like dev.

    python bench/answers_heldout_sentences.py recipes/smollm2-edge.yaml \
        INT4_RUN/artifacts/02-export-onnx EDGE_RUN/artifacts/05-quantize-onnx --rows 1000

(INT4_RUN and EDGE_RUN: the run directories of recipes/smollm2-sst2-int4.yaml and recipes/smollm2-edge.yaml.)

Why: SST-2's train file holds every phrase of its sentences (67,349 rows from about 6,900 sentences), so the
recipe's tuning rows (`data.holdout`, a random sample) are mostly short phrases, and many of them are
substrings of the rows the steps train on. They told the edge model's int4 cost apart from nothing (500 rows:
0.856 → 0.854), while SST-2 dev, which holds whole sentences of other reviews, showed 1.5 points.

The rows here are train rows that are whole sentences (no other train row contains them), of at least
`--min-words` words, that are not tuning rows and are neither a substring nor a superstring of any row in the
seeded sample the steps draw their train rows from (`--exclude-sample`: `sample_rows` with the recipe's seed
draws a prefix of the same sequence for every smaller count, so the 2,560 covers finetune's 500, distill's up to
2,560 and calibration's rows). A seeded shuffle picks `--rows` of them. Settings may be chosen on these rows;
dev stays for reporting.

Prints one Markdown row per artifact: accuracy, and against the first artifact the rows only it answered,
the rows only this one answered, and the standard error of the paired difference.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import random
from pathlib import Path


def heldout_sentences(train: list, tuning: list, all_texts: list[str], exclude: list, template: str, rows: int,
                      min_words: int, seed: int) -> list:
    """Whole-sentence train rows of at least `min_words` words, content-disjoint from `exclude` and `tuning`
    (rows read as prompts through `template`, whose `{text}` is the file's sentence)."""
    before, after = template.split("{text}", 1)

    def text(row) -> str:
        return str(row.text)[len(before):len(str(row.text)) - len(after)].strip()

    corpus = "\n".join(all_texts)
    used = {text(r) for r in exclude} | {text(r) for r in tuning}
    used_long = [u for u in used if len(u) > 15]  # very short phrases ("the", "a movie") occur everywhere
    candidates = [r for r in train if len(text(r).split()) >= min_words]
    random.Random(seed).shuffle(candidates)
    chosen = []
    for row in candidates:
        t = text(row)
        if t in used or corpus.count(t) != 1 or any(t in u or u in t for u in used_long):
            continue
        chosen.append(row)
        if len(chosen) == rows:
            break
    return chosen


def main() -> int:
    """Score every artifact on the held-out sentences."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--exclude-sample", type=int, default=2560)
    parser.add_argument("--seed", type=int, default=1, help="seed of the shuffle that picks the rows")
    parser.add_argument("--tuning-rows", action="store_true",
                        help="score the recipe's own tuning rows instead, with the same paired columns")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from compressor.models.artifact import Artifact
    from compressor.models.data import TUNE
    from compressor.host import build_host
    from compressor.recipe.plan import build_plan
    from compressor.tasks import text_generation as generation
    from compressor.models.training import sample_rows

    plan = build_plan(args.recipe, build_host())
    train, tuning = plan.data.load("train"), plan.data.load(TUNE)
    with open(plan.data.splits["train"], encoding="utf-8", newline="") as f:  # tuning rows included
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        all_texts = [row[plan.data.text].strip() for row in reader]
    rows = heldout_sentences(train, tuning, all_texts, sample_rows(train, args.exclude_sample, plan.recipe.seed),
                             plan.data.prompt or "{text}", args.rows, args.min_words, args.seed)
    if args.tuning_rows:
        rows = tuning

    hits: list[bool] = []
    score = generation.TextGeneration.score

    def recording_score(self, answered, answers, labels):  # the evaluator's own scoring, row by row
        hits[:] = [generation.normalise(a) == generation.normalise(str(r.label)) for r, a in zip(answered, answers)]
        return score(self, answered, answers, labels)

    generation.TextGeneration.score = recording_score

    class Settings:  # what the evaluator reads: every chosen row, no perplexity, no timing
        threads = args.threads
        latency = False
        task = {"accuracy_rows": len(rows)}

    print(f"{len(rows)} tuning rows\n" if args.tuning_rows else
          f"{len(rows)} held-out train sentences of {args.min_words} words or more\n")
    print("| artifact | accuracy | only the first | only this | s.e. of the difference |\n|---|---:|---:|---:|---:|")
    first: list[bool] | None = None
    for path in args.artifacts:
        result = generation.GenerationEvaluator().evaluate(Artifact.load(path), rows, Settings())
        if first is None:
            first = list(hits)
            print(f"| {path} | {result['accuracy']:.4f} | | | |", flush=True)
            continue
        lost = sum(a and not b for a, b in zip(first, hits))
        won = sum(b and not a for a, b in zip(first, hits))
        print(f"| {path} | {result['accuracy']:.4f} | {lost} | {won} | {math.sqrt(lost + won) / len(rows):.4f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
