"""Batch-1 latency of int8 variants of one ONNX model, measured interleaved so that machine drift
hits every variant alike: rounds of `--runs` calls per variant, in turn, `--rounds` times, over the
same real SST-2 dev sentences. Prints each variant's median and its ratio to Optimum's int8.
Asserts nothing; the candidates are quantize-onnx mode: auto's (docs/quantization.md).

Optimum's int8 model is made in a side virtual environment (bench/optimum_compat.py builds it on the first
run), because optimum-onnx 0.1.0 requires transformers<4.58 and compressor runs on transformers 5; it comes
back as a plain ONNX file and is timed here, interleaved with the others, with this process's onnxruntime.
The side venv's versions are printed above the table.

    python bench/int8_latency.py runs/bench-int8/artifacts/02-export-onnx [--rounds 10 --runs 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def variants(onnx_dir: Path, work: Path, excluded: int = 2) -> tuple[dict[str, Path], dict[str, str]]:
    """Optimum's documented path (its config for this CPU, made in the optimum side venv) and quantize-onnx
    mode: auto's candidates on the fused model (optimize-onnx's output in the same run), the float-node ones
    from measured sensitivity. Returns the models and the side venv's package versions."""
    import argparse

    from compare import optimum_models
    from compressor.models.artifact import Artifact
    from compressor.plugins.quantize_onnx.tune import Candidate, base_candidates, matmul_form, quantize_dynamic_file, \
        rank_nodes
    from compressor.models.data import DataSource

    optimum = optimum_models(onnx_dir, work, o2=False)
    out = {f"Optimum {optimum['config']} dynamic (unfused)": optimum["int8"] / "model.onnx"}
    fused = optimize_output(onnx_dir)
    if fused is None:
        return out, optimum["side"]
    source = matmul_form(fused / "model.onnx", work / "fused.onnx")
    rows = DataSource("tsv", {"eval": Path(__file__).resolve().parents[2] / "shared/data/sst2/dev.tsv"},
                      "sentence", "label").load("eval")[:32]
    first = base_candidates()[0]
    ranked = list(rank_nodes(Artifact.load(fused), source, first,
                             argparse.Namespace(op_types=None, exclude_nodes=[]), rows, 2))
    candidates = base_candidates() + [Candidate(f"{first.name}, {k} most sensitive in float", first.weight_type,
                                                first.per_channel, first.reduce_range, tuple(ranked[:k]))
                                      for k in range(1, excluded + 1)]
    for candidate in candidates:
        target = work / f"{len(out)}.onnx"
        quantize_dynamic_file(source, target, candidate, None, [])
        out[f"fused, {candidate.name}"] = target
    return out, optimum["side"]


def optimize_output(onnx_dir: Path) -> Path | None:
    """The optimize-onnx artifact of the run that `onnx_dir` belongs to, read from its record.json."""
    import json

    record = onnx_dir.parent.parent / "record.json"
    if not record.is_file():
        return None
    steps = json.loads(record.read_text())["steps"]
    return next((Path(s["path"]) for s in steps if s["uses"] == "optimize-onnx"), None)


def dev_feeds(onnx_dir: Path) -> list[dict[str, Any]]:
    """One tokenized feed per SST-2 dev sentence (batch 1), with the tokenizer beside the model."""
    import numpy as np
    from transformers import AutoTokenizer

    from compressor.models.data import DataSource

    rows = DataSource("tsv", {"eval": Path(__file__).resolve().parents[2] / "shared/data/sst2/dev.tsv"},
                      "sentence", "label").load("eval")
    tokenizer = AutoTokenizer.from_pretrained(str(onnx_dir))
    return [{k: v.astype(np.int64) for k, v in tokenizer([r.text], return_tensors="np").items()} for r in rows]


def time_interleaved(models: dict[str, Path], feeds: list[dict[str, Any]] | dict[str, list[dict[str, Any]]],
                     rounds: int, runs: int, threads: int | dict[str, int],
                     disabled: dict[str, list[str]] | None = None) -> dict[str, list[float]]:
    """Batch-1 call times (ms) of each model, round after round: `rounds` passes of `runs` calls per model,
    each pass starting one model later, so that machine drift and neighbour effects hit every model alike.
    `feeds`: one list for every model, or a list by model name (models with different tokenizers; the same
    sentences in the same order). `threads`: one intra-op thread count, or one by model name. `disabled`:
    onnxruntime optimizers to leave off, by model name."""
    from compressor.models.loading import ort_session

    threads_of = threads if isinstance(threads, dict) else {name: threads for name in models}
    sessions = {name: ort_session(path, threads_of[name], (disabled or {}).get(name, ()))
                for name, path in models.items()}
    feeds_of = feeds if isinstance(feeds, dict) else {name: feeds for name in models}
    inputs = {name: {i.name for i in s.get_inputs()} for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm-up
        for feed in feeds_of[name][:20]:
            session.run(None, {k: v for k, v in feed.items() if k in inputs[name]})
    names = list(sessions)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for i in range(runs):
                own = feeds_of[name]
                feed = {k: v for k, v in own[(r * runs + i) % len(own)].items() if k in inputs[name]}
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def print_table(models: dict[str, Path], times: dict[str, list[float]], base_name: str, base_label: str) -> None:
    """Median, p90, ratio to the base variant and size, one line per variant."""
    import numpy as np

    base = statistics.median(times[base_name])
    print(f"{'variant':<52} {'p50 ms':>8} {'p90 ms':>8} {base_label:>12} {'size MB':>8}")
    for name, values in times.items():
        p50, p90 = statistics.median(values), float(np.percentile(values, 90))
        print(f"{name:<52} {p50:8.3f} {p90:8.3f} {p50 / base:11.3f}× {models[name].stat().st_size / 1e6:8.2f}")


def main() -> None:
    """Build the variants, time them interleaved, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    feeds = dev_feeds(args.onnx_dir)
    models, side = variants(args.onnx_dir, Path(tempfile.mkdtemp(prefix="int8-latency-")))
    times = time_interleaved(models, feeds, args.rounds, args.runs, args.threads)
    from compare import side_line

    print(f"Optimum's model made in the optimum side venv: {side_line(side)}; timed here")
    print_table(models, times, next(iter(models)), "vs optimum")


if __name__ == "__main__":
    main()
