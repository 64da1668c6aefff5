"""Every int8 candidate of quantize-onnx `mode: auto`, measured on the tuning rows and on the dev rows,
with the predictions each one flips: how well the tuning rows stand in for the rows the report quotes,
and how much noise a smaller tuning set leaves on a measured drop. Asserts nothing.

    python bench/int8_candidates.py runs/minilm-sst2-int8 [--small 1000] [--excluded 2]

It reads the run's record for the float model the search started from and the recipe's tuning rows
(data.holdout / data.validation); `--small` also scores a seeded subset of that many tuning rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    """Quantize with every candidate, predict the dev and tuning rows, print the table."""
    import numpy as np

    from compressor.models.artifact import Artifact
    from compressor.models.data import DataSource
    from compressor.models.loading import load_runner
    from compressor.plugins.quantize_onnx.tune import (Candidate, base_candidates, matmul_form, quantize_dynamic_file,
                                                  rank_nodes)
    from compressor.models.training import sample_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--small", type=int, default=1000, help="Also score a seeded subset of this many rows.")
    parser.add_argument("--excluded", type=int, default=2, help="Candidates with up to this many nodes in float.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    record = json.loads((args.run_dir / "record.json").read_text())
    step = next(s for s in record["steps"] if s["uses"] == "quantize-onnx" and s["config"]["mode"] == "auto")
    floating = Artifact.load(Path(record["steps"][step["index"] - 1]["path"]))
    spec, recipe_dir = record["recipe"]["data"], Path(record["recipe_path"]).parent
    splits = {k: (recipe_dir / spec[k]).resolve() for k in ("train", "eval", "validation") if spec.get(k)}
    data = DataSource(spec["format"], splits, spec["text"], spec["label"], holdout=spec.get("holdout"),
                      seed=record["seed"])
    tune = sample_rows(data.load("tune"), step["config"]["tuning_rows"], record["seed"])
    sets = {"dev": data.load("eval"), "tune": tune, "small": sample_rows(tune, args.small, record["seed"])}
    work = Path(tempfile.mkdtemp(prefix="int8-candidates-"))
    source = matmul_form(floating.model_file, work / "float.onnx")

    def predictions(model_file: Path) -> dict[str, Any]:
        import shutil

        target = work / "artifact"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(floating.path, target, ignore=shutil.ignore_patterns("*.onnx"))
        shutil.copy2(model_file, target / "model.onnx")
        runner = load_runner(Artifact.load(target), args.threads)
        out = {}
        for name, rows in sets.items():
            texts = [r.text for r in rows]
            out[name] = np.concatenate([runner(runner.encode(texts[i:i + 32])).argmax(-1)
                                        for i in range(0, len(texts), 32)])
        return out

    gold = {name: np.array([int(r.label) for r in rows]) for name, rows in sets.items()}
    reference = predictions(source)
    first = base_candidates()[0]
    ranked = list(rank_nodes(floating, source, first, argparse.Namespace(op_types=step["config"]["op_types"],
                                                                          exclude_nodes=step["config"]["exclude_nodes"]),
                             tune[:32], args.threads))
    candidates = base_candidates() + [Candidate(f"{first.name}, {k} most sensitive in float", first.weight_type,
                                                first.per_channel, first.reduce_range, tuple(ranked[:k]))
                                      for k in range(1, args.excluded + 1)]
    acc0 = {k: float((reference[k] == gold[k]).mean()) for k in sets}
    print(f"float: dev {acc0['dev']:.4f}, {len(tune)} tuning rows {acc0['tune']:.4f}; most sensitive: {ranked[:3]}")
    print(f"| candidate | dev Δ pt | dev flips | {args.small} tuning rows Δ pt | {len(tune)} tuning rows Δ pt "
          f"| tuning flips | MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for candidate in candidates:
        target = work / "candidate.onnx"
        quantize_dynamic_file(source, target, candidate, step["config"]["op_types"], step["config"]["exclude_nodes"])
        got = predictions(target)
        delta = {k: 100 * (float((got[k] == gold[k]).mean()) - acc0[k]) for k in sets}
        flips = {k: 100 * float((got[k] != reference[k]).mean()) for k in sets}
        print(f"| {candidate.name} | {delta['dev']:+.2f} | {flips['dev']:.2f}% | {delta['small']:+.2f} | "
              f"{delta['tune']:+.2f} | {flips['tune']:.2f}% | {target.stat().st_size / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
