"""Side-by-side benchmark on the MiniLM fine-tuned on SST-2 by the main job:

    PyTorch FP32 eager · ONNX Runtime FP32 · Optimum's dynamic int8 (ORTQuantizer) ·
    PyTorch dynamic int8 (torch.ao) · our int8 recipe · our edge recipe

and the fused operators in our optimize-onnx output against Optimum's ORTOptimizer O2 output.

Every row is measured in this one process with the same threads, the same real dev sentences and
the same warm-up, and the latencies are taken in round-robin passes over all rows, so that a change
in the machine's speed during the run affects every row alike. Prints the table and writes it with its figures
to `--out` (default runs/compare/: compare.md and compare.json). Asserts nothing.

Optimum's two models (its dynamic int8 and its O2 graph) are made in a side virtual environment, by
bench/optimum_compat.py's side process, because optimum-onnx 0.1.0 requires transformers<4.58 and compressor
runs on transformers 5. They come back as plain ONNX files and are timed and scored here, with this
process's onnxruntime, like every other row; the side venv's versions (transformers, optimum-onnx,
onnxruntime) are printed and saved in compare.json. The side venv is built on the first run (see
bench/optimum_compat.py) and reused after.

    python bench/compare.py [--runs 200] [--rounds 5] [--threads 2] [--out runs/compare]

It runs both recipes first (cached after their first run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # optimum_compat, beside this file

REPO = Path(__file__).resolve().parent.parent
FUSION_COLUMNS = ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization", "LayerNormalization")
RECIPES = {"int8": REPO / "recipes" / "minilm-sst2-int8.yaml", "edge": REPO / "recipes" / "minilm-sst2-edge.yaml"}


def run_recipe(name: str) -> dict[str, Any]:
    """Run (or reuse from the cache) one recipe; returns its record."""
    out = REPO / "runs" / f"bench-{name}"
    done = subprocess.run([sys.executable, "-m", "compressor", "run", str(RECIPES[name]), "--out", str(out)],
                          stdout=subprocess.DEVNULL)
    if done.returncode not in (0, 1):  # 1: the recipe's guard failed; its artifacts are measured all the same
        raise SystemExit(f"compressor run {RECIPES[name]} failed with exit {done.returncode}")
    return json.loads((out / "record.json").read_text())


def fused_ops(model_file: Path) -> dict[str, int]:
    """How many of each fused transformer operator a graph holds."""
    import onnx

    from compressor.plugins.optimize_onnx import FUSED_OPS

    ops = [n.op_type for n in onnx.load(str(model_file), load_external_data=False).graph.node]
    return {op: ops.count(op) for op in FUSED_OPS if ops.count(op)}


def optimum_config_name() -> str:
    """The AutoQuantizationConfig constructor for this CPU's instruction set, the one Optimum's docs would pick."""
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


def optimum_models(onnx_dir: Path, work: Path, o2: bool = True) -> dict[str, Any]:
    """Optimum's documented dynamic quantization path (ORTQuantizer with AutoQuantizationConfig for this CPU,
    is_static=False, per_channel=False) in work/optimum and, with `o2`, its graph optimizer at level O2 (its
    documented transformer fusions) in work/optimum-o2: each a plain model.onnx, made in the optimum side venv
    (one process for both; optimum-onnx needs transformers<4.58). Returns {"int8": dir, "o2": dir or None,
    "config": the AutoQuantizationConfig name, "side": the side venv's package versions}."""
    from optimum_compat import optimum_produce

    config = optimum_config_name()
    jobs = [{"kind": "quantize", "dir": str(onnx_dir), "out": str(work / "optimum"), "config": config}]
    if o2:
        jobs.append({"kind": "optimize", "dir": str(onnx_dir), "out": str(work / "optimum-o2"), "level": "O2"})
    side = optimum_produce(jobs)
    return {"int8": work / "optimum", "o2": work / "optimum-o2" if o2 else None, "config": config, "side": side}


def side_line(side: dict[str, str]) -> str:
    """The side venv's versions that matter for the Optimum rows, as one phrase."""
    return ", ".join(f"{k} {side[k]}" for k in ("transformers", "optimum-onnx", "onnxruntime") if k in side)


def targets(rows: list[dict[str, Any]], edge_record: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The targets this table measures (docs/results.md, encoder int8 and edge chain): (target, measured, met).
    The edge recipe's accuracy is read against its own fine-tune, as its guard reads it."""
    by_name = {r["row"]: r for r in rows}
    finetune = next(a["accuracy"] for a in edge_record["artifacts"] if a["name"] == "finetune")
    edge_drop = edge_record["artifacts"][-1]["accuracy"] - finetune
    optimum = by_name["Optimum dynamic int8 (ORTQuantizer)"]
    int8, edge = by_name[f"compressor {RECIPES['int8'].name}"], by_name[f"compressor {RECIPES['edge'].name}"]
    speed = int8["p50_ms"] / optimum["p50_ms"]
    return [
        ("int8 recipe: accuracy within 0.3 pt of FP32", f"{int8['accuracy_change'] * 100:+.2f} pt",
         int8["accuracy_change"] >= -0.003),
        ("int8 recipe: ≥ 3.9× smaller than ONNX FP32", f"{int8['x_smaller']:.2f}×", int8["x_smaller"] >= 3.9),
        ("int8 recipe: batch-1 p50 no slower than Optimum's int8",
         f"{int8['p50_ms']:.2f} ms against {optimum['p50_ms']:.2f} ms: {speed:.2f}× Optimum's", speed <= 1.0),
        ("edge recipe: ≥ 11× smaller than ONNX FP32", f"{edge['x_smaller']:.2f}× ({edge['size_bytes'] / 1e6:.2f} MB)",
         edge["x_smaller"] >= 11),
        ("edge recipe: accuracy within 1.0 pt of its fine-tuned model", f"{edge_drop * 100:+.2f} pt",
         edge_drop >= -0.01),
        ("edge recipe: ≥ 5× faster than ONNX Runtime FP32 at batch 1", f"{edge['x_faster_b1']:.2f}×",
         edge["x_faster_b1"] >= 5),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="Round-robin timing passes over all rows.")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare", help="where compare.md/.json go")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from compressor.models.artifact import Artifact, copy_companions
    from compressor.models.data import DataSource
    from compressor.evaluate.base import EvalSettings
    from compressor.evaluate.measure import model_bytes
    from compressor.evaluate.logits import LogitsEvaluator
    from compressor.tasks.text_classification import TextClassification
    from compressor.run.record import cpu_name, environment

    records = {name: run_recipe(name) for name in RECIPES}
    steps = {s["uses"]: Path(s["path"]) for s in records["int8"]["steps"]}
    fp32_hf, fp32_onnx = Artifact.load(steps["finetune"]), Artifact.load(steps["export-onnx"])
    rows = DataSource("tsv", {"eval": REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"}, "sentence",
                      "label").load("eval")
    settings = EvalSettings(threads=args.threads, batch_sizes=(1, 32), runs=args.runs, warmup=20, latency=False)
    evaluator = LogitsEvaluator(TextClassification())
    work = Path(tempfile.mkdtemp(prefix="compressor-bench-"))

    rows_out: list[dict[str, Any]] = []
    runners: list[Any] = []

    def measure(label: str, artifact: Artifact, size: int, note: str = "") -> None:
        """Accuracy now; latency later, interleaved with every other row's (see time_all)."""
        from compressor.models.loading import load_runner

        result = evaluator.evaluate(artifact, rows, settings)
        rows_out.append({"row": label, "accuracy": result["accuracy"], "size_bytes": size, "note": note})
        runners.append(load_runner(artifact, args.threads))
        print(f"{label}: acc {result['accuracy']:.4f} size {size / 1e6:.1f} MB", file=sys.stderr)

    def time_all() -> None:
        """Latency of every row in `--rounds` round-robin passes of runs/rounds calls each, so that
        drift of the machine's speed during the benchmark hits every row alike; each figure is the
        median over the passes."""
        import statistics

        from compressor.evaluate.measure import latency

        texts = [r.text for r in rows]
        passes: list[list[dict[str, Any]]] = [[] for _ in runners]
        for round_ in range(args.rounds):
            # each pass starts one row later, so that no row always follows the same neighbour
            for i in [(round_ + k) % len(runners) for k in range(len(runners))]:
                runner = runners[i]
                # PyTorch's OpenMP threads keep spinning for a while after a call; without a pause
                # they steal the cores from whichever row is timed next
                time.sleep(1.0)
                passes[i].append(latency(runner, texts, [1, 32], max(1, args.runs // args.rounds), 20))
        for row, results in zip(rows_out, passes):
            row["p50_ms"] = statistics.median(r["p50_ms"] for r in results)
            row["p90_ms"] = statistics.median(r["p90_ms"] for r in results)
            row["throughput_b32"] = statistics.median(r["b32"]["throughput"] for r in results)
            print(f"{row['row']}: p50 {row['p50_ms']:.2f} ms", file=sys.stderr)

    measure("PyTorch FP32 eager", fp32_hf, model_bytes(fp32_hf))
    measure("ONNX Runtime FP32", fp32_onnx, model_bytes(fp32_onnx))
    # Optimum's int8 and O2 models, made in the side venv; timed and scored here like every other row.
    # Its O2 graph is for the fusion comparison only: its ORTQuantizer cannot quantize the fused graph
    # (onnxruntime's quantizer needs DefaultTensorType for contrib ops, which Optimum's quantization
    # config does not pass), so there is no Optimum "O2 + int8" row to time.
    optimum = optimum_models(fp32_onnx.path, work)
    copy_companions(fp32_onnx, optimum["int8"])  # config and tokenizer beside Optimum's model
    opt = fp32_onnx.derive(optimum["int8"], format="onnx")
    measure("Optimum dynamic int8 (ORTQuantizer)", opt, model_bytes(opt),
            f"AutoQuantizationConfig.{optimum['config']}(is_static=False, per_channel=False), quantized in the "
            f"optimum side venv ({side_line(optimum['side'])}), timed here")
    fusion = {"compressor optimize-onnx": fused_ops(steps["optimize-onnx"] / "model.onnx"),
              "Optimum ORTOptimizer O2": fused_ops(optimum["o2"] / "model.onnx")}

    # torch.ao dynamic int8, through compressor's own quantize-torch step (int8 weights in safetensors)
    from compressor.plugins.quantize_torch import QuantizeTorch, QuantizeTorchConfig
    from compressor.step import StepContext

    torch_dir = work / "torch-int8"
    torch_dir.mkdir()
    ctx = StepContext(out_dir=torch_dir, data=None, source=fp32_hf, seed=0, threads=args.threads, recipe_dir=REPO)
    torch_int8 = QuantizeTorch().run(fp32_hf, QuantizeTorchConfig(), ctx)
    measure("PyTorch dynamic int8 (torch.ao)", torch_int8, model_bytes(torch_int8), "Linear layers, head left float")

    for name, record in records.items():
        final = Artifact.load(Path(record["steps"][-1]["path"]))
        measure(f"compressor {RECIPES[name].name}", final, model_bytes(final))

    time_all()
    base = next(r for r in rows_out if r["row"] == "ONNX Runtime FP32")
    fp32_acc = rows_out[0]["accuracy"]
    for r in rows_out:
        r["accuracy_change"] = r["accuracy"] - fp32_acc
        r["x_smaller"] = base["size_bytes"] / r["size_bytes"]
        r["x_faster_b1"] = base["p50_ms"] / r["p50_ms"]
    env = environment()
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx", "amx", "fma", "sse4"))}) \
        if Path("/proc/cpuinfo").exists() else []
    results = {"date": date.today().isoformat(), "command": "python bench/compare.py " + " ".join(sys.argv[1:]),
               "cpu": cpu_name(), "cpu_flags": flags, "threads": args.threads, "runs": args.runs,
               "libraries": env["libraries"], "python": env["python"],
               "optimum_side_venv": {"config": optimum["config"], "libraries": optimum["side"]},
               "rows": rows_out, "fusion": fusion,
               "steps": {name: [{"uses": s["uses"], "notes": s["notes"]} for s in rec["steps"]]
                         for name, rec in records.items()},
               "recipe_reports": {name: [{k: a.get(k) for k in ("name", "format", "accuracy", "size_bytes",
                                                                "parameters")}
                                         for a in rec["artifacts"]] for name, rec in records.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = ["# Benchmark: MiniLM-L6 fine-tuned on SST-2", "",
             f"`{results['command']}` on {results['date']} · {results['cpu']} ({', '.join(flags)}) · "
             f"{args.threads} threads · {args.runs} timed runs per batch size, in {args.rounds} round-robin passes "
             f"over all rows (each after 20 warm-up runs; figures are medians over the passes) · "
             f"SST-2 dev (872 sentences; batch-1 latency cycles through them) · python {env['python']} · "
             + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()), "",
             "Optimum's rows (its int8 model and its O2 graph) were made in a side venv, because optimum-onnx "
             f"needs transformers<4.58: {side_line(optimum['side'])}; they are timed and scored in this process "
             "like every other row.", "",
             "Latency is the model call (tokenization excluded), median (p50) and 90th percentile over the "
             "runs. Ratios are against ONNX Runtime FP32 measured in the same run; quote the ratios, since "
             "absolute times vary from machine to machine.", "",
             "| row | accuracy | Δ vs FP32 | size (MB) | ×smaller | p50 ms (b1) | p90 ms (b1) | ×faster (b1) | "
             "throughput/s (b32) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows_out:
        lines.append(f"| {r['row']} | {r['accuracy']:.4f} | {r['accuracy_change'] * 100:+.2f} pt | "
                     f"{r['size_bytes'] / 1e6:.2f} | {r['x_smaller']:.2f}× | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['x_faster_b1']:.2f}× | {r['throughput_b32']:.1f} |")
    notes = [f"- {r['row']}: {r['note']}" for r in rows_out if r["note"]]
    lines += ["", *notes, "", "## Graph fusion on the FP32 export (operators in the graph)", "",
              "| optimizer | " + " | ".join(FUSION_COLUMNS) + " |", "|---|" + "---:|" * len(FUSION_COLUMNS)]
    lines += [f"| {who} | " + " | ".join(str(ops.get(op, 0)) for op in FUSION_COLUMNS) + " |"
              for who, ops in fusion.items()]
    lines += ["", "## What each step of the edge recipe contributed", "",
              "| step | accuracy | size (MB) | parameters |", "|---|---:|---:|---:|"]
    for a in results["recipe_reports"]["edge"]:
        acc = f"{a['accuracy']:.4f}" if a.get("accuracy") is not None else "–"
        lines.append(f"| {a['name']} ({a['format']}) | {acc} | {a['size_bytes'] / 1e6:.2f} | "
                     f"{a['parameters'] or '–'} |")
    lines += ["", "## Targets measured by this run", "", "| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in targets(rows_out, records["edge"])]
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
