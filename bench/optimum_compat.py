"""Do our ONNX artifacts load unchanged in Optimum? Compares, on the first SST-2 dev rows:

    our logits — onnxruntime run on the artifact's model.onnx in this process (compressor's venv)
    Optimum's  — ORTModelForSequenceClassification.from_pretrained(dir) (ORTModelForTokenClassification
                 where config.json's architecture ends with ForTokenClassification), called on the same texts,
                 and a transformers pipeline built on that ORTModel

and prints, per artifact, the largest |logit difference|, whether the argmax labels agree on every row,
whether the pipeline's labels are ours, and the package versions on both sides. Exit 1 when a difference
is over 1e-4, a label disagrees or Optimum cannot load a directory.

    python bench/optimum_compat.py [--run runs/minilm-sst2-int8] [--rows 200]
    python bench/optimum_compat.py ARTIFACT_DIR [ARTIFACT_DIR ...]

Without directories it checks the `artifacts/*-export-onnx`, `*-optimize-onnx` and `*-quantize-onnx`
directories of the run directory (`--run`, default runs/minilm-sst2-int8, which
`compressor run recipes/minilm-sst2-int8.yaml` writes). Each directory holds model.onnx, config.json and
the tokenizer files. The texts are the first `--rows` of ../shared/data/sst2/dev.tsv beside the checkout.

Optimum runs in a side virtual environment, because optimum-onnx 0.1.0 requires transformers<4.58 and
compressor runs on transformers 5. It is built once, on the first run (`--venv`, default
~/.cache/compressor-bench/optimum-venv, or under $XDG_CACHE_HOME), with torch==2.13.0 (pinned: an
unpinned torch pulls a multi-gigabyte CUDA build), transformers==4.57.6, optimum-onnx==0.1.0 and the
onnxruntime of this venv, and reused after. That process runs with HF_HUB_OFFLINE=1: nothing is
downloaded from a model hub. This file is also the side process's program (`--worker`), so it imports
nothing beyond the standard library at the top.

The same side venv makes Optimum's own models for bench/compare.py and bench/int8_latency.py:
`optimum_produce(jobs)` runs Optimum's ORTQuantizer (dynamic int8) and ORTOptimizer (O2) there, in one
side process (`--produce`), and leaves plain ONNX files that those benches time and score with the
onnxruntime of their own process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEV_TSV = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
DEFAULT_RUN = REPO / "runs" / "minilm-sst2-int8"
STEP_GLOBS = ("*-export-onnx", "*-optimize-onnx", "*-quantize-onnx")
TORCH = "torch==2.13.0"
SIDE_REQUIREMENTS = ("transformers==4.57.6", "optimum-onnx==0.1.0")
ORT_FALLBACK = "onnxruntime>=1.18"  # what optimum-onnx 0.1.0's onnxruntime extra accepts
SHOWN_PACKAGES = ("torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "onnxruntime", "onnx",
                  "numpy", "huggingface-hub")
MAX_DIFF = 1e-4
MARKER = "compressor-bench.json"


# ---------------------------------------------------------------- side venv

def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "compressor-bench" / "optimum-venv"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_side_venv(venv: Path) -> Path:
    """Build the side venv (once); reuse it when its marker names the same requirements."""
    from importlib.metadata import version

    ort_pin = f"onnxruntime=={version('onnxruntime')}"
    wanted = [TORCH, *SIDE_REQUIREMENTS, ort_pin]
    python = venv_python(venv)
    marker = venv / MARKER
    if python.exists() and marker.exists() and json.loads(marker.read_text()).get("wanted") == wanted:
        return python
    print(f"building the optimum side venv in {venv} (once) ...", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)  # first and alone, so nothing later can pick another torch
    installed = subprocess.run([*pip, *SIDE_REQUIREMENTS, ort_pin])
    if installed.returncode != 0:
        print(f"{ort_pin} did not install beside optimum-onnx; trying {ORT_FALLBACK}", file=sys.stderr)
        subprocess.run([*pip, *SIDE_REQUIREMENTS, ORT_FALLBACK], check=True)
    marker.write_text(json.dumps({"wanted": wanted}))
    return python


def side_env() -> dict[str, str]:
    """The side process's environment: offline (nothing downloaded from a model hub), no user site, no PYTHONPATH."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    return env


def side_versions(python: Path) -> dict[str, str]:
    """The side venv's `pip freeze`, restricted to the packages that matter here."""
    frozen = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    found = {}
    for line in frozen.stdout.splitlines():
        name, _, ver = line.partition("==")
        if ver and name.lower().replace("_", "-") in SHOWN_PACKAGES:
            found[name.lower().replace("_", "-")] = ver
    return found


def our_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in SHOWN_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------- inputs and our side

def read_texts(path: Path, rows: int) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        texts = [row["sentence"] for _, row in zip(range(rows), reader)]
    if not texts:
        raise SystemExit(f"{path} has no rows")
    return texts


def artifact_dirs(args: argparse.Namespace) -> list[Path]:
    if args.dirs:
        dirs = [Path(d).resolve() for d in args.dirs]
    else:
        run = Path(args.run).resolve()
        dirs = sorted({d for pattern in STEP_GLOBS for d in (run / "artifacts").glob(pattern) if d.is_dir()})
        if not dirs:
            raise SystemExit(f"no {', '.join(STEP_GLOBS)} directories under {run / 'artifacts'}: "
                             f"run `compressor run recipes/minilm-sst2-int8.yaml` first, or pass directories")
    for d in dirs:
        missing = [name for name in ("model.onnx", "config.json") if not (d / name).is_file()]
        if missing:
            raise SystemExit(f"{d} has no {' or '.join(missing)}")
    return dirs


def is_token_classifier(directory: Path) -> bool:
    archs = json.loads((directory / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForTokenClassification") for a in archs)


def our_logits(directory: Path, texts: list[str], batch: int, threads: int) -> dict[str, Any]:
    """onnxruntime on model.onnx, fed only the graph's inputs, texts tokenized together (one padded length)."""
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="np", return_special_tokens_mask=True)
    absent = [n for n in names if n not in enc]
    if absent:
        raise SystemExit(f"{directory}: the graph wants {absent}, which the tokenizer does not give")
    parts = [session.run(["logits"], {n: enc[n][s:s + batch].astype(np.int64) for n in names})[0]
             for s in range(0, len(texts), batch)]
    return {"logits": np.concatenate(parts), "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "special": enc["special_tokens_mask"], "inputs": names}


# ---------------------------------------------------------------- the side process (optimum's venv)

def worker(request_file: Path) -> None:
    """Runs in the side venv: load each directory with Optimum, write logits and pipeline labels."""
    import traceback

    request = json.loads(request_file.read_text())
    results = []
    for item in request["artifacts"]:
        try:
            results.append(optimum_side(item, request["texts"], request["batch"], request["threads"]))
        except Exception as exc:  # reported per artifact, so the other directories are still compared
            traceback.print_exc()
            results.append({"error": f"{type(exc).__name__}: {exc}".strip()})
    Path(request["out"]).write_text(json.dumps(results))


def optimum_side(item: dict[str, Any], texts: list[str], batch: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTModelForTokenClassification
    from transformers import AutoTokenizer, pipeline

    token = item["token"]
    cls = ORTModelForTokenClassification if token else ORTModelForSequenceClassification
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    model = cls.from_pretrained(item["dir"], session_options=options, provider="CPUExecutionProvider")
    tokenizer = AutoTokenizer.from_pretrained(item["dir"])
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    logits = np.concatenate([model(**{k: v[s:s + batch] for k, v in enc.items()}).logits.detach().cpu().numpy()
                             for s in range(0, len(texts), batch)])
    np.savez(item["out"], logits=logits, input_ids=enc["input_ids"].numpy())
    task = "token-classification" if token else "text-classification"
    pipe = pipeline(task, model=model, tokenizer=tokenizer)
    predictions = pipe(texts, batch_size=batch, truncation=True) if not token else pipe(texts, batch_size=batch)
    labels = ([[[int(p["index"]), p["entity"]] for p in row] for row in predictions] if token
              else [p["label"] for p in predictions])
    return {"class": cls.__name__, "pipeline": type(pipe).__name__, "inputs": list(model.input_names),
            "labels": labels}


# ---------------------------------------------------------------- Optimum's own models, for the other benches

def optimum_produce(jobs: list[dict[str, str]], venv: Path | None = None) -> dict[str, str]:
    """Make Optimum's models in the side venv (built on first use), all `jobs` in one side process, and
    return that venv's package versions. Each job reads `dir` (model.onnx + config.json) and leaves a plain
    `out`/model.onnx and Optimum's ort_config.json:

        {"kind": "quantize", "dir": ..., "out": ..., "config": "avx2"}  ORTQuantizer, dynamic, with
            AutoQuantizationConfig.<config>(is_static=False, per_channel=False)
        {"kind": "optimize", "dir": ..., "out": ..., "level": "O2"}     ORTOptimizer, AutoOptimizationConfig.<level>()
        {"kind": "export", "dir": ..., "out": ..., "task": "text-classification", "opset": 17}
            optimum's main_export of a transformers checkpoint `dir` (what export-onnx ran before transformers 5)
    """
    python = ensure_side_venv(venv or default_venv())
    with tempfile.TemporaryDirectory(prefix="optimum-produce-") as tmp:
        request, results = Path(tmp) / "request.json", Path(tmp) / "results.json"
        request.write_text(json.dumps({"jobs": jobs, "out": str(results)}))
        done = subprocess.run([str(python), str(Path(__file__).resolve()), "--produce", str(request)],
                              env=side_env())
        if done.returncode != 0:
            raise RuntimeError(f"Optimum's side process failed (exit {done.returncode}); its traceback is above")
        return json.loads(results.read_text())["versions"]


def produce(request_file: Path) -> None:
    """Runs in the side venv: Optimum's quantizer or optimizer on each job's directory (see optimum_produce)."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    request = json.loads(request_file.read_text())
    for job in request["jobs"]:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        if job["kind"] == "export":
            main_export(job["dir"], output=str(out), task=job["task"], opset=job["opset"], do_validation=False,
                        local_files_only=True, library_name="transformers")
            continue
        with tempfile.TemporaryDirectory(dir=out) as tmp:  # Optimum also saves config and tokenizer: not kept
            if job["kind"] == "quantize":
                config = getattr(AutoQuantizationConfig, job["config"])(is_static=False, per_channel=False)
                ORTQuantizer.from_pretrained(job["dir"], file_name="model.onnx").quantize(
                    save_dir=tmp, quantization_config=config)
            elif job["kind"] == "optimize":
                config = getattr(AutoOptimizationConfig, job["level"])()
                ORTOptimizer.from_pretrained(job["dir"], file_names=["model.onnx"]).optimize(
                    save_dir=tmp, optimization_config=config)
            else:
                raise ValueError(f"unknown job kind {job['kind']!r}")
            keep_model(Path(tmp), out)
    Path(request["out"]).write_text(json.dumps({"versions": our_versions()}))


def keep_model(saved: Path, out: Path) -> None:
    """Move Optimum's one model file (model_quantized.onnx, model_optimized.onnx) to out/model.onnx, with its
    external weights (names unchanged, as the graph refers to them) and ort_config.json."""
    models = sorted(saved.glob("*.onnx"))
    if len(models) != 1:
        raise RuntimeError(f"expected one .onnx file from Optimum in {saved}, found {[m.name for m in models]}")
    models[0].replace(out / "model.onnx")
    for extra in [*saved.glob("*.onnx_data"), *saved.glob("*.data"), *saved.glob("ort_config.json")]:
        extra.replace(out / extra.name)


# ---------------------------------------------------------------- comparison and report

def compare(directory: Path, ours: dict[str, Any], side: dict[str, Any], npz: Path) -> dict[str, Any]:
    import numpy as np

    id2label = {int(k): v for k, v in json.loads((directory / "config.json").read_text())["id2label"].items()}
    if "error" in side:
        return {"ok": False, "error": side["error"]}
    theirs = np.load(npz)
    same_ids = theirs["input_ids"].shape == ours["input_ids"].shape and bool(
        (theirs["input_ids"] == ours["input_ids"]).all())
    if theirs["logits"].shape != ours["logits"].shape:
        return {"ok": False, "error": f"logits shapes differ: ours {ours['logits'].shape}, "
                                      f"optimum {theirs['logits'].shape}", "same_ids": same_ids}
    diff = float(np.abs(theirs["logits"] - ours["logits"]).max())
    our_arg, their_arg = ours["logits"].argmax(-1), theirs["logits"].argmax(-1)
    token = ours["logits"].ndim == 3
    mask = ours["attention_mask"].astype(bool) if token else np.ones(our_arg.shape, bool)
    argmax_agree = bool((our_arg[mask] == their_arg[mask]).all())
    if token:  # the pipeline reports the non-O, non-special tokens: (index, entity) per row
        expected = [[[int(i), id2label[int(our_arg[r, i])]] for i in range(our_arg.shape[1])
                     if mask[r, i] and not ours["special"][r, i] and id2label[int(our_arg[r, i])] != "O"]
                    for r in range(our_arg.shape[0])]
    else:
        expected = [id2label[int(a)] for a in our_arg]
    pipeline_agree = side["labels"] == expected
    counts = Counter(id2label[int(a)] for a in our_arg[mask])
    return {"ok": diff <= MAX_DIFF and argmax_agree and pipeline_agree, "diff": diff, "argmax": argmax_agree,
            "counts": ", ".join(f"{label} {n}" for label, n in counts.most_common()),
            "pipeline": pipeline_agree, "token": token, "same_ids": same_ids, "class": side["class"],
            "pipeline_class": side["pipeline"], "inputs": ours["inputs"], "optimum_inputs": side["inputs"]}


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def table(directory: Path, rows: int, result: dict[str, Any], ours: dict[str, str], side: dict[str, str]) -> str:
    lines = [f"### {directory.name}", "", f"`{directory}`", "", "| | |", "|---|---|", f"| rows compared | {rows} |"]
    if "error" in result:
        lines.append(f"| optimum | **failed**: {result['error'].replace('|', '/')} |")
    else:
        lines += [f"| loaded with | `{result['class']}.from_pretrained(dir)`, pipeline `{result['pipeline_class']}` |",
                  f"| graph inputs (ours / optimum feeds) | {', '.join(result['inputs'])} / "
                  f"{', '.join(result['optimum_inputs'])} |",
                  f"| tokenization identical | {yes(result['same_ids'])} |",
                  f"| max abs logit diff | {result['diff']:.3g} {'≤' if result['diff'] <= MAX_DIFF else '>'} "
                  f"{MAX_DIFF:g} |",
                  f"| argmax labels agree on all {'tokens' if result['token'] else 'rows'} | "
                  f"{yes(result['argmax'])} (ours: {result['counts']}) |",
                  f"| pipeline labels equal ours | {yes(result['pipeline'])} |"]
    fmt = lambda v: ", ".join(f"{k} {x}" for k, x in v.items())  # noqa: E731
    lines += [f"| ours (this venv) | {fmt(ours)} |", f"| optimum side venv | {fmt(side)} |",
              f"| result | {'pass' if result['ok'] else '**FAIL**'} |", ""]
    return "\n".join(lines)


def run_both(dirs: list[Path], texts: list[str], python: Path, batch: int,
             threads: int) -> list[dict[str, Any]] | None:
    """Our logits here, Optimum's in the side venv (one process for all directories); None if it crashed."""
    with tempfile.TemporaryDirectory(prefix="optimum-compat-") as tmp:
        work = Path(tmp)
        ours = [our_logits(d, texts, batch, threads) for d in dirs]
        items = [{"dir": str(d), "token": is_token_classifier(d), "out": str(work / f"optimum-{i}.npz")}
                 for i, d in enumerate(dirs)]
        request = work / "request.json"
        request.write_text(json.dumps({"artifacts": items, "texts": texts, "batch": batch, "threads": threads,
                                       "out": str(work / "results.json")}))
        done = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(request)], env=side_env())
        if done.returncode != 0:
            print(f"the optimum side process failed (exit {done.returncode})", file=sys.stderr)
            return None
        sides = json.loads((work / "results.json").read_text())
        return [compare(d, o, s, Path(item["out"])) for d, o, s, item in zip(dirs, ours, sides, items)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", help="artifact directories (model.onnx + config.json + tokenizer)")
    parser.add_argument("--run", default=str(DEFAULT_RUN), help="run directory whose ONNX artifacts to check")
    parser.add_argument("--rows", type=int, default=200, help="first rows of SST-2 dev to compare on")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads on both sides")
    parser.add_argument("--venv", default=None, help="the side venv (default ~/.cache/compressor-bench/...)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--produce", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return 0
    if args.produce:
        produce(Path(args.produce))
        return 0
    dirs = artifact_dirs(args)
    texts = read_texts(DEV_TSV, args.rows)
    python = ensure_side_venv(Path(args.venv) if args.venv else default_venv())
    results = run_both(dirs, texts, python, args.batch, args.threads)
    if results is None:
        return 1
    mine, theirs = our_versions(), side_versions(python)
    print(f"## Optimum loads our ONNX artifacts: first {len(texts)} rows of SST-2 dev\n")
    for d, result in zip(dirs, results):
        print(table(d, len(texts), result, mine, theirs))
    failed = [d.name for d, r in zip(dirs, results) if not r["ok"]]
    print(f"{len(dirs) - len(failed)} of {len(dirs)} artifacts pass"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
