"""The edge recipe's batch-1 speed-up over the full model's ONNX FP32 export, with its noise.

The run's fine-tuned model (the edge chain's teacher, the full six layers) is exported to ONNX FP32 as
export-onnx does, and it and the run's final model, one session of each at every `--threads` value, are
timed interleaved (bench/int8_latency.time_interleaved: rounds of `--runs` calls per session on the same
SST-2 dev sentences, each through the model's own tokenizer; each round starting one session later).
Each round gives one ratio per thread count, the FP32 median over the edge median; the figure is the median
of the rounds' ratios, with their 10th and 90th percentiles, so that a slow stretch of the machine moves
one round, not the figure. With several thread counts it also counts the rounds in which the edge model
ran slower at the most threads than at the fewest (a machine whose cores are shared shows such stretches)
and gives the median ratios of those rounds and of the others apart. The edge model's disabled optimizers
(artifact.json) are honoured as the bundle's runtime honours them. Asserts nothing.

    python bench/edge_speedup.py runs/minilm-sst2-edge [--rounds 40 --runs 50 --threads 2 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FP32 = "ONNX FP32 (full model)"


def fp32_export(run_dir: Path, work: Path) -> Path:
    """The run's fine-tuned model exported to ONNX FP32 with export-onnx's exporter (parity is export-onnx's
    own check in the recipe; here the file is only timed)."""
    from compressor.export.onnx import DEFAULT_ENCODER_EXPORTER, export_with_torch
    from compressor.models.artifact import Artifact
    from compressor.tasks import task_for

    record = json.loads((run_dir / "record.json").read_text())
    finetune = Artifact.load(Path(next(s["path"] for s in record["steps"] if s["uses"] == "finetune")))
    export_with_torch(finetune, task_for(finetune.task), work, 17, DEFAULT_ENCODER_EXPORTER)
    return work / "model.onnx"


def round_ratios(base: list[float], model: list[float], runs: int) -> list[float]:
    """One ratio per round: the median of the base's calls over the median of the model's calls."""
    return [statistics.median(base[i:i + runs]) / statistics.median(model[i:i + runs])
            for i in range(0, len(base), runs)]


def main() -> None:
    """Export the baseline, time both models at every thread count in the same rounds, print the ratios."""
    import numpy as np

    from compressor.models.artifact import Artifact
    from int8_latency import dev_feeds, time_interleaved

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="an edge recipe's run directory (record.json)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = parser.parse_args()
    record = json.loads((args.run_dir / "record.json").read_text())
    edge = Artifact.load(Path(record["steps"][-1]["path"]))
    fp32 = fp32_export(args.run_dir, Path(tempfile.mkdtemp(prefix="edge-speedup-")))
    # each model reads the sentences through its own tokenizer (the edge model's vocabulary is trimmed)
    feeds = {FP32: dev_feeds(fp32.parent), "edge": dev_feeds(edge.path)}
    models = {FP32: fp32, "edge": edge.path / "model.onnx"}
    disabled = list(edge.info.disabled_optimizers or ())
    print(f"edge model: {models['edge']}; disabled optimizers: {disabled or 'none'}")
    names = {(model, threads): f"{model}@{threads}" for threads in args.threads for model in models}
    times = time_interleaved({n: models[m] for (m, _), n in names.items()},
                             {n: feeds[m] for (m, _), n in names.items()}, args.rounds, args.runs,
                             {n: t for (_, t), n in names.items()},
                             {n: disabled for (m, _), n in names.items() if m == "edge"})
    ratios = {t: round_ratios(times[names[FP32, t]], times[names["edge", t]], args.runs) for t in args.threads}
    print(f"{'threads':>7} {'FP32 p50 ms':>11} {'edge p50 ms':>11} {'×faster (median of rounds)':>27} "
          f"{'p10':>6} {'p90':>6}")
    for t in args.threads:
        print(f"{t:>7} {statistics.median(times[names[FP32, t]]):11.3f} "
              f"{statistics.median(times[names['edge', t]]):11.3f} {statistics.median(ratios[t]):26.2f}× "
              f"{np.percentile(ratios[t], 10):6.2f} {np.percentile(ratios[t], 90):6.2f}")
    most, fewest = max(args.threads), min(args.threads)
    if most != fewest:
        edge_most = round_ratios(times[names["edge", fewest]], times[names["edge", most]], args.runs)
        slow = [edge_most[r] < 1 for r in range(args.rounds)]
        print(f"rounds in which the edge model ran slower at {most} threads than at {fewest}: "
              f"{sum(slow)} of {args.rounds}")
        for label, keep in (("those rounds", True), ("the other rounds", False)):
            picked = [r for r in range(args.rounds) if slow[r] == keep]
            if picked:
                print(f"  median ×faster in {label}: " + ", ".join(
                    f"{statistics.median(ratios[t][r] for r in picked):.2f}× at {t}" for t in args.threads))


if __name__ == "__main__":
    main()
