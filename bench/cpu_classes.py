"""int8 results across CPU classes, measured under emulation (qemu-user; bench/emulation/setup.sh).

ONNX Runtime's int8 kernels differ between CPU classes (compressor/run/cpu.py). This machine runs one
class natively; qemu runs onnxruntime's real kernels of others: x86 AVX2 (saturating U8S8), x86 SSE,
and ARM64 NEON / dot-product / i8mm. (qemu has no AVX-VNNI, AVX-512 or AMX.) Asserts nothing.

    # what a run's final model gives on each class: dev accuracy, agreement, largest logit difference
    python bench/cpu_classes.py logits runs/minilm-sst2-int8 [--classes avx2,sse41,arm64,arm64-dotprod]

    # a sentence-embedding run's final model: largest embedding difference and lowest cosine to this
    # machine's embedding, STS-B dev Spearman, over golden sentences and dev pairs (the bundle tolerance)
    python bench/cpu_classes.py embeddings runs/minilm-stsb-int8 [--pairs 200]

    # the recipe's quantize-onnx mode: auto search, rerun with another class's kernels (x86 classes only),
    # then the chosen model's dev accuracy there: does the recipe pass its guard on that CPU class?
    python bench/cpu_classes.py search recipes/minilm-sst2-int8.yaml --cpu-class avx2 [--out runs/int8-avx2]

Both read the cache the native run filled; only the class-dependent step (mode: auto) reruns.
Under emulation everything is 150-300× slower: `logits` takes minutes per class, `search` about an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUN_AS = HERE / "emulation" / "run_as.sh"
DEV = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
STS_DEV = REPO.parent / "shared" / "data" / "stsbenchmark" / "sts-dev.csv"


def _worker(model: str, feeds: str, out: str) -> None:
    """Runs under emulation with numpy and onnxruntime only: logits of every feed batch."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    data = np.load(feeds)
    batches = sorted({k.split("/")[0] for k in data.files}, key=lambda b: int(b[1:]))
    t0 = time.perf_counter()
    logits = [session.run(None, {n: data[f"{b}/{n}"] for n in names})[0] for b in batches]
    np.savez(out, logits=np.concatenate(logits), seconds=time.perf_counter() - t0)


def _final_and_float(run_dir: Path) -> tuple[Path, Path]:
    """The run's final model directory and the one before its first quantization."""
    steps = json.loads((run_dir / "record.json").read_text())["steps"]
    first_q = next(i for i, s in enumerate(steps) if s["uses"].startswith("quantize"))
    return Path(steps[-1]["path"]), Path(steps[first_q - 1]["path"])


def _feeds(model_dir: Path, rows: list[Any], target: Path, batch: int = 32) -> Path:
    """Dev sentences tokenized with the artifact's tokenizer.json, in padded batches, as one npz."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(128)
    tokenizer.enable_padding()
    arrays = {}
    for b in range(0, len(rows), batch):
        enc = tokenizer.encode_batch([r.text for r in rows[b:b + batch]])
        for name, column in (("input_ids", [e.ids for e in enc]), ("attention_mask", [e.attention_mask for e in enc]),
                             ("token_type_ids", [e.type_ids for e in enc])):
            arrays[f"b{b // batch}/{name}"] = np.asarray(column, dtype=np.int64)
    np.savez(target, **arrays)
    return target


def _outputs_on(cls: str, model: Path, feeds: Path, out: Path) -> Any:
    """The model's first output for every feed batch, computed by _worker with CPU class `cls`'s kernels."""
    import numpy as np

    env = {**os.environ, "PY": sys.executable}
    subprocess.run(["bash", str(RUN_AS), cls, __file__, "_worker", str(model), str(feeds), str(out)], check=True,
                   env=env)
    return np.load(out)


def logits(run_dir: Path, classes: list[str], work: Path, models: list[str]) -> None:
    """Dev accuracy, agreement with this machine and largest logit difference, per class."""
    import numpy as np

    from compressor.run.cpu import describe
    from compressor.models.data import DataSource

    rows = DataSource("tsv", {"eval": DEV}, "sentence", "label").load("eval")
    gold = np.array([int(r.label) for r in rows])
    final, floating = _final_and_float(run_dir)
    feeds = _feeds(final, rows, work / "feeds.npz")
    print(f"host: {describe()}; model: {final}")
    print(f"{'class':<16} {'model':<6} {'dev acc':>8} {'agree':>7} {'max |Δlogit|':>13} {'p99 |Δlogit|':>13} {'s':>7}")
    reference: dict[str, Any] = {}
    for cls in ["native"] + [c for c in classes if c != "native"]:
        for label, model_dir in (("int8", final), ("float", floating)):
            if label not in models:
                continue
            got = _outputs_on(cls, model_dir / "model.onnx", feeds, work / f"{cls}-{label}.npz")
            values = got["logits"]
            if cls == "native":
                reference[label] = values
            diff = np.abs(values - reference[label])
            agree = (values.argmax(-1) == reference[label].argmax(-1)).mean()
            print(f"{cls:<16} {label:<6} {(values.argmax(-1) == gold).mean():8.4f} {agree:7.2%} {diff.max():13.3g} "
                  f"{np.percentile(diff, 99):13.3g} {float(got['seconds']):7.1f}", flush=True)


def embeddings(run_dir: Path, classes: list[str], work: Path, pairs: int) -> None:
    """Per class: the largest |difference| of an embedding element and the lowest cosine against this machine's
    embeddings of the same sentences (the task's golden sentences and STS-B dev pairs), and Spearman on the pairs."""
    from types import SimpleNamespace

    import numpy as np
    from scipy.stats import spearmanr

    from compressor.models.data import DataSource
    from compressor.run.cpu import describe
    from compressor.tasks.sentence_embedding import SentenceEmbedding

    columns = ["genre", "source", "year", "id", "score", "sentence1", "sentence2"]
    rows = DataSource("tsv", {"eval": STS_DEV}, ["sentence1", "sentence2"], "score", columns=columns).load("eval")
    rows = rows[:pairs]
    golden = [t for g in SentenceEmbedding.golden_inputs for t in (g if isinstance(g, tuple) else (g,))]
    texts = golden + [r.text[0] for r in rows] + [r.text[1] for r in rows]
    gold = np.array([float(r.label) for r in rows])
    final, _ = _final_and_float(run_dir)
    feeds = _feeds(final, [SimpleNamespace(text=t) for t in texts], work / "sts-feeds.npz")
    print(f"host: {describe()}; model: {final}; {len(golden)} golden sentences, {len(rows)} dev pairs")
    print(f"{'class':<16} {'max |Δ| golden':>15} {'max |Δ| all':>12} {'min cosine':>11} {'spearman':>9} {'s':>7}")
    reference = None
    for cls in ["native"] + [c for c in classes if c != "native"]:
        got = _outputs_on(cls, final / "model.onnx", feeds, work / f"{cls}-embeddings.npz")
        values = got["logits"]
        reference = values if reference is None else reference
        diff = np.abs(values - reference)
        cos = (values * reference).sum(1) / np.linalg.norm(values, axis=1) / np.linalg.norm(reference, axis=1)
        n, g = len(rows), len(golden)
        a, b = values[g:g + n], values[g + n:]
        sims = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"{cls:<16} {diff[:g].max():15.3g} {diff.max():12.3g} {cos.min():11.5f} "
              f"{100 * spearmanr(sims, gold).statistic:9.4f} {float(got['seconds']):7.1f}", flush=True)


def search(recipe: Path, out: Path) -> None:
    """Inside the emulator: run the recipe's steps through the cache (the class-dependent search reruns),
    then measure the float and the final artifact on the eval rows with this class's kernels."""
    from compressor.run.cache import Cache
    from compressor.run.cpu import describe
    from compressor.evaluate.base import EvalSettings
    from compressor.host import build_host
    from compressor.run.pipeline import Runner
    from compressor.recipe.plan import build_plan

    host = build_host()
    plan = build_plan(recipe, host)
    runner = Runner(plan, host, out, Cache(), log=lambda s: print(s, flush=True))
    print(f"cpu: {describe()}", flush=True)
    from compressor.models.artifact import hash_dir

    current, current_hash, history, steps = plan.source, hash_dir(plan.source.path), [("input", plan.source)], []
    from compressor.run.cache import make_key

    first_key = make_key(current_hash, plan.source.task, plan.source.labels, plan.source.info.has_head)
    for i, planned in enumerate(plan.steps):
        current, record = runner.run_step(planned, current, current_hash, history,
                                          key_basis=first_key if i == 0 else None)
        history.append((planned.name, current))
        current_hash = record["output_hash"]
        steps.append(record)
    rows = runner.eval_rows()
    evaluator = host.evaluator_for(current.task, "onnx")
    settings = EvalSettings(threads=2, latency=False)
    floating = next(a for name, a in reversed(history[:-1]) if a.format == "onnx" and not a.info.quantized)
    result = {"cpu": describe(), "float": evaluator.evaluate(floating, rows, settings),
              "final": evaluator.evaluate(current, rows, settings),
              "search": next((s["notes"].get("search") for s in steps if "search" in s["notes"]), None)}
    (out / "cpu_class_search.json").write_text(json.dumps(result, indent=2, default=str))
    from compressor.plugins.quantize_onnx.report import search_markdown

    if result["search"]:
        print("\n".join(search_markdown({"index": len(steps) - 1, "uses": "quantize-onnx",
                                         "notes": {"search": result["search"]}})))
    metric = evaluator.metric
    drop = result["float"][metric] - result["final"][metric]
    print(f"\neval rows ({len(rows)}), {describe()['int8_kernels']} kernels: float {result['float'][metric]:.4f}, "
          f"final {result['final'][metric]:.4f} (drop {drop:+.4f}; the guard allows "
          f"{plan.recipe.guard.max_accuracy_drop})")


def main() -> None:
    """Command line (see the module docstring)."""
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_search":
        sys.path.insert(0, str(REPO))
        search(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("logits")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--classes", default="avx2,sse41,arm64,arm64-dotprod,arm64-i8mm")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cpu-classes")
    p.add_argument("--models", default="int8,float", help="int8 (the final model), float (before quantization)")
    p = sub.add_parser("embeddings")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--classes", default="avx2,sse41,arm64,arm64-dotprod,arm64-i8mm")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cpu-classes")
    p.add_argument("--pairs", type=int, default=200, help="STS-B dev pairs beside the golden sentences")
    p = sub.add_parser("search")
    p.add_argument("recipe", type=Path)
    p.add_argument("--cpu-class", default="avx2", help="an x86 class run_as.sh emulates (avx2, sse41)")
    p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "logits":
        args.work.mkdir(parents=True, exist_ok=True)
        logits(args.run_dir, [c for c in args.classes.split(",") if c], args.work, args.models.split(","))
    elif args.command == "embeddings":
        args.work.mkdir(parents=True, exist_ok=True)
        embeddings(args.run_dir, [c for c in args.classes.split(",") if c], args.work, args.pairs)
    else:
        out = args.out or Path("runs") / f"{args.recipe.stem}-{args.cpu_class}"
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(["bash", str(RUN_AS), args.cpu_class, __file__, "_search", str(args.recipe.resolve()),
                        str(out.resolve())], check=True, env=env)


if __name__ == "__main__":
    main()
