"""Bundles: the final model, its tokenizer and labels, `predict.py` (numpy + onnxruntime +
tokenizers only), a device README and `manifest.json` with checksums, metrics and golden outputs.
Also the safe reading of `.tar.gz` bundles."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from compressor import __version__
from compressor.bundle.device import runtime as bundle_runtime
from compressor.bundle.device import server as bundle_server
from compressor.models.artifact import Artifact, hash_file
from compressor.models.formats import bundle_formats, format_named
from compressor.run.cache import write_json_atomic
from compressor.errors import InputError

#: Opset → first onnxruntime release that implements it.
OPSET_MIN_ORT = {11: "1.6", 12: "1.7", 13: "1.8", 14: "1.10", 15: "1.11", 16: "1.12", 17: "1.13", 18: "1.14",
                 19: "1.16", 20: "1.17", 21: "1.20", 22: "1.20", 23: "1.22"}
#: Contrib operators → first onnxruntime release that has them.
OP_MIN_ORT = {"MatMulNBits": "1.17", "GatherBlockQuantized": "1.20", "DynamicQuantizeMatMul": "1.6",
              "MatMulInteger": "1.6", "QLinearMatMul": "1.6"}
#: Operators whose arithmetic runs in onnxruntime's integer kernels, which differ between CPU classes.
INTEGER_KERNEL_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QLinearMatMul",
                      "QLinearConv", "ConvInteger", "QuantizeLinear", "DequantizeLinear", "MatMulNBits",
                      "DynamicQuantizeLSTM", "QEmbedLayerNormalization"}
#: Largest golden-logit difference allowed where the device's int8 kernel class is the one the golden
#: outputs were computed with (same kernels: only float rounding and thread partitioning differ).
SAME_CLASS_TOLERANCE = 1e-3
#: … and where it is another class. bench/cpu_classes.py ran the main job's int8 model (tuned and golden on
#: x86 AVX512-VNNI) with onnxruntime's real ARM64 dot-product kernels under qemu on the 872 SST-2 dev
#: sentences: largest |logit difference| 0.418, p99 0.112, 99.89% of predictions the same (docs/results.md,
#: "CPU classes"). Both classes sum int8 products exactly in int32; what differs is how each
#: quantizes activations. x86 AVX2 without VNNI saturates pairs of products in 16 bits and differed by up
#: to 0.687 (p99 0.454, 98.51% the same, −0.8 points): beyond this tolerance on purpose, so that verify
#: says such a CPU needs its own measurement (SATURATING_CLASSES in bundle_runtime explains why).
OTHER_CLASS_TOLERANCE = 0.5
DEVICE_README = """# {name}

A {task} model made by compressor {version}. It needs Python 3, numpy, onnxruntime (>= {min_ort})
and tokenizers; nothing else.

    pip install numpy onnxruntime tokenizers
    python predict.py --verify          # checksums, model load, golden outputs
    python predict.py "{example}"

Serve it over HTTP (OpenAI- and KServe v2-compatible; 127.0.0.1 unless --host says otherwise):

    pip install fastapi uvicorn prometheus_client jinja2
    python serve.py --port 8000

Labels: {labels}. Measured before shipping ({measured_on}): {metrics}.
"""


def _version_max(versions: list[str]) -> str:
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def describe_model(model_file: Path) -> dict[str, Any]:
    """Inputs, outputs (names, shapes, dtypes), opset and the minimum onnxruntime, read with onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    io = lambda items: [{"name": i.name, "dtype": i.type, "shape": [d if isinstance(d, int) else str(d)  # noqa: E731
                                                                      for d in i.shape]} for i in items]
    info: dict[str, Any] = {"file": model_file.name, "format": model_file.suffix.lstrip("."),
                            "inputs": io(session.get_inputs()), "outputs": io(session.get_outputs())}
    minimum = ["1.13"]
    if model_file.suffix == ".onnx":
        import onnx

        model = onnx.load(str(model_file), load_external_data=False)
        from compressor.models import onnx_opset

        opset = onnx_opset(model)
        info["opset"] = opset
        info["operators"] = sorted({n.op_type for n in model.graph.node})
        minimum.append(OPSET_MIN_ORT.get(opset, ort.__version__.rsplit(".", 1)[0]))
        minimum += [OP_MIN_ORT[n.op_type] for n in model.graph.node if n.op_type in OP_MIN_ORT]
        uint8_tables = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8}
        for node in model.graph.node:
            if node.op_type == "GatherBlockQuantized" and node.input[0] in uint8_tables:
                # uint8 tables: 4-bit without zero points from 1.22, zero points and 8 bits from 1.23
                bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
                minimum.append("1.23" if bits != 4 or any(node.input[3:4]) else "1.22")
    else:  # an .ort file is tied to the onnxruntime that wrote it
        minimum.append(ort.__version__.rsplit(".", 1)[0])
    info["min_onnxruntime"] = _version_max(minimum)
    return info


#: New tokens per golden input of a generation bundle.
GOLDEN_NEW_TOKENS = 16
def write_bundle(artifact: Artifact, out: Path, record: dict[str, Any] | None = None,
                 golden_inputs: list[Any] | None = None, tar: bool = False) -> dict[str, Any]:
    """Write the bundle into `out` (a temporary directory renamed into place); returns where and what."""
    from compressor.tasks import task_for

    out = checked_target(artifact, out)
    task = task_for(artifact.task)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        copy_bundle_files(artifact, tmp, task)
        manifest = bundle_manifest(artifact, tmp, task, record or {})
        inputs = list(golden_inputs or task.golden_inputs)[:4]
        add_golden(manifest, tmp, task, inputs)
        (tmp / "README.md").write_text(DEVICE_README.format(
            name=(record or {}).get("name", artifact.path.name), task=artifact.task, version=__version__,
            min_ort=manifest["min_onnxruntime"],
            labels=", ".join(artifact.labels[:20]) or "none (the model answers in text)",
            example=inputs[0] if isinstance(inputs[0], str) else " ".join(inputs[0]),
            measured_on=manifest["measured_on"]["cpu"] or "not measured",
            metrics=json.dumps(manifest["metrics"])), encoding="utf-8")
        manifest["files"] = {p.name: {"size": p.stat().st_size, "sha256": hash_file(p)}
                             for p in sorted(tmp.iterdir()) if p.name != bundle_runtime.MANIFEST}
        write_json_atomic(tmp / bundle_runtime.MANIFEST, manifest)
        publish(tmp, out, tar)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "files": sorted(manifest["files"]), "tar": str(out.with_name(out.name + ".tar.gz"))
            if tar else None, "min_onnxruntime": manifest["min_onnxruntime"]}


def checked_target(artifact: Artifact, out: Path) -> Path:
    """`out`, resolved, once the artifact can be bundled and `out` is new or an earlier bundle (InputError else)."""
    if not format_named(artifact.format).bundleable:
        raise InputError(f"a bundle needs a model ONNX Runtime runs ({' or '.join(bundle_formats())}), the artifact "
                         f"is {artifact.format}",
                         where="bundle", hint="end the recipe with export-onnx (and quantize-onnx)")
    if not (artifact.path / "tokenizer.json").is_file():
        raise InputError(f"{artifact.path} has no tokenizer.json, which the device runtime reads",
                         where="bundle", hint="use a fast tokenizer (saved as tokenizer.json)")
    out = Path(out).resolve()
    if out.exists() and not (out.is_dir() and (out / bundle_runtime.MANIFEST).is_file()):
        raise InputError(f"{out} exists and is not a bundle; compressor replaces only earlier bundles",
                         where="--out", hint="choose a new directory for the bundle")
    if out == Path.cwd() or out in Path.cwd().parents or out == artifact.path or out in artifact.path.parents:
        raise InputError(f"{out} contains the current directory or the model itself", where="--out",
                         hint="choose a new directory for the bundle")
    return out


def copy_bundle_files(artifact: Artifact, tmp: Path, task: Any) -> None:
    """The model, the tokenizer, predict.py and what the task's runtime needs beside them."""
    shutil.copy2(artifact.model_file, tmp / artifact.model_file.name)
    shutil.copy2(artifact.path / "tokenizer.json", tmp / "tokenizer.json")
    shutil.copy2(bundle_runtime.__file__, tmp / "predict.py")
    shutil.copy2(bundle_server.__file__, tmp / "serve.py")
    module = importlib.import_module(task.answers_module())
    shutil.copy2(module.__file__, tmp / Path(module.__file__).name)
    for name, source in task.bundle_files(artifact).items():
        shutil.copy2(source, tmp / name)
    if (artifact.path / "required_operators.config").is_file():  # for a minimal onnxruntime build
        shutil.copy2(artifact.path / "required_operators.config", tmp / "required_operators.config")


def bundle_manifest(artifact: Artifact, tmp: Path, task: Any, record: dict[str, Any]) -> dict[str, Any]:
    """manifest.json without its golden outputs and file checksums: model, tokenizer, metrics, provenance."""
    from compressor.run.cpu import cpu_model, int8_kernel_class

    model = describe_model(tmp / artifact.model_file.name)
    if artifact.info.disabled_optimizers:  # the runtime loads the model as it was measured
        model["disabled_optimizers"] = list(artifact.info.disabled_optimizers)
    tokenizer = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    pad = next((t for t in tokenizer.get("added_tokens", []) if t["content"] in ("[PAD]", "<pad>")), None)
    final = record.get("artifacts", [{}])[-1]
    metrics = {k: final.get(k) for k in (final.get("metric"), "size_bytes", "parameters") if k}
    if final.get("latency"):
        metrics["latency"] = {k: final["latency"][k] for k in ("p50_ms", "p90_ms", "throughput", "throughput_batch",
                                                              "ttft_ms", "decode_tokens_per_s", "peak_rss_mb")
                              if k in final["latency"]}
    environment = record.get("environment", {})
    integer = sorted({op for op in model.get("operators", []) if op in INTEGER_KERNEL_OPS})
    module = task.answers_module()
    manifest: dict[str, Any] = {
        "schema_version": bundle_runtime.SCHEMA_VERSION, "name": record.get("name") or artifact.path.name,
        "task": artifact.task, "labels": artifact.labels,
        # what the device-side runtime reads instead of the task's name: the rows' shape and the answer
        "input": "words" if task.word_level else "text",
        "output": module.rpartition(".")[2], "output_module": module,
        "model": model, "min_onnxruntime": model["min_onnxruntime"],
        "tokenizer": {"file": "tokenizer.json", "max_length": artifact.max_length, "pad_id": pad["id"] if pad else 0,
                      "pad_token": pad["content"] if pad else "[PAD]"},
        "compressor": __version__, "recipe_hash": record.get("recipe_hash"),
        "metrics": metrics,
        "measured_on": {"cpu": environment.get("cpu"), "int8_kernels": environment.get("int8_kernels"),
                        "threads": record.get("evaluation", {}).get("threads"),
                        "libraries": environment.get("libraries", {})},
        "tuned_on": None,  # a step that chose settings on this CPU says so in its bundle_facts
        # the golden logits below were computed here, with this CPU's kernels
        "golden_on": {"cpu": cpu_model(), "int8_kernels": int8_kernel_class()},
        "integer_operators": integer,
        # on a CPU with the same int8 kernels the outputs repeat to float rounding; on another class
        # integer kernels give other logits, by as much as bench/cpu_classes.py measured (see
        # OTHER_CLASS_TOLERANCE); a float model's kernels differ by rounding only
        "tolerance": SAME_CLASS_TOLERANCE,
        "tolerance_other_class": OTHER_CLASS_TOLERANCE if integer else SAME_CLASS_TOLERANCE,
        "golden": [],
    }
    manifest.update(step_facts(record))
    manifest.update(task.bundle_manifest(artifact))
    return manifest


def step_facts(record: dict[str, Any]) -> dict[str, Any]:
    """What the run's steps add to the manifest (each registered step's bundle_facts of its notes)."""
    from compressor.host import current_host

    steps = current_host().steps
    facts: dict[str, Any] = {}
    for s in record.get("steps", []):
        cls = steps.get(s.get("uses", ""))
        if cls:
            facts.update(cls.bundle_facts(s.get("notes") or {}))
    return facts


def add_golden(manifest: dict[str, Any], tmp: Path, task: Any, inputs: list[Any]) -> None:
    """The bundle's own outputs for `inputs`, run by the device runtime from `tmp` and given by the task's
    answers module (logits for a classifier, greedy tokens for a generator: what verify compares)."""
    listed = {p.name: {} for p in tmp.iterdir()}  # what the device runtime may load before checksums exist
    write_json_atomic(tmp / bundle_runtime.MANIFEST, {**manifest, "files": listed})
    predictor = bundle_runtime.Predictor(tmp, {**manifest, "files": listed})
    manifest["golden"] = predictor.answers.golden(inputs, GOLDEN_NEW_TOKENS)


def publish(tmp: Path, out: Path, tar: bool) -> None:
    """Move the finished bundle into place (and write `out`.tar.gz beside it when asked), atomically."""
    if tar:
        archive = out.with_name(out.name + ".tar.gz")
        partial = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
        with tarfile.open(partial, "w:gz") as fh:
            for p in sorted(tmp.iterdir()):
                fh.add(p, arcname=p.name)
        os.replace(partial, archive)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a bundle archive into `target`, refusing absolute paths, `..`, links and devices."""
    try:
        with tarfile.open(archive, "r:*") as fh:
            members = fh.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
                    raise InputError(f"{archive}: entry {m.name!r} points outside the archive", where=str(archive),
                                     hint="this archive is unsafe; rebuild it with `compressor bundle --tar`")
                if not (m.isfile() or m.isdir()):
                    kind = "a link" if (m.issym() or m.islnk()) else "a device or special file"
                    raise InputError(f"{archive}: entry {m.name!r} is {kind}, which bundles never contain",
                                     where=str(archive), hint="rebuild the archive with `compressor bundle --tar`")
            # the checks above already refuse what the "data" filter would; use it too where Python has it
            if hasattr(tarfile, "data_filter"):
                fh.extractall(target, members=members, filter="data")
            else:
                fh.extractall(target, members=members)
    except tarfile.TarError as exc:
        raise InputError(f"{archive} is not a readable tar archive: {exc}", where=str(archive)) from None


def open_bundle(path: Path, workdir: Path) -> Path:
    """A bundle directory, or a `.tar.gz` safely unpacked under `workdir`."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.is_file() and tarfile.is_tarfile(path):
        target = workdir / "bundle"
        target.mkdir(parents=True)
        safe_extract(path, target)
        return target
    raise InputError(f"{path} is neither a bundle directory nor a tar archive", where=str(path),
                     hint="give the directory written by `compressor bundle`, or its .tar.gz")
