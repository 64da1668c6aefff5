"""The edge recipe's batch-1 speed-up over the full model's ONNX FP32 export, with its noise.

The run's fine-tuned model (the edge chain's teacher, the full six layers) is exported to ONNX FP32 as
export-onnx does, and it and the run's final model are timed interleaved (bench/int8_latency.time_interleaved:
rounds of `--runs` calls per model on the same SST-2 dev sentences, each through
the model's own tokenizer; each round starting with the other model).
Each round gives one ratio, the FP32 median over the edge median; the figure is the median of the rounds'
ratios, with their 10th and 90th percentiles, so that a slow stretch of the machine moves one round, not
the figure. At every `--threads` value; the edge model's disabled optimizers (artifact.json) are honoured as
the bundle's runtime honours them. Asserts nothing.

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
    """Export the baseline, time both models at each thread count, print the ratios."""
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
    feeds = {"ONNX FP32 (full model)": dev_feeds(fp32.parent), "edge": dev_feeds(edge.path)}
    models = {"ONNX FP32 (full model)": fp32, "edge": edge.path / "model.onnx"}
    disabled = {"edge": list(edge.info.disabled_optimizers or ())}
    print(f"edge model: {models['edge']}; disabled optimizers: {disabled['edge'] or 'none'}")
    print(f"{'threads':>7} {'FP32 p50 ms':>11} {'edge p50 ms':>11} {'×faster (median of rounds)':>27} "
          f"{'p10':>6} {'p90':>6}")
    for threads in args.threads:
        times = time_interleaved(models, feeds, args.rounds, args.runs, threads, disabled)
        base, model = times["ONNX FP32 (full model)"], times["edge"]
        ratios = round_ratios(base, model, args.runs)
        print(f"{threads:>7} {statistics.median(base):11.3f} {statistics.median(model):11.3f} "
              f"{statistics.median(ratios):26.2f}× {np.percentile(ratios, 10):6.2f} {np.percentile(ratios, 90):6.2f}")


if __name__ == "__main__":
    main()
