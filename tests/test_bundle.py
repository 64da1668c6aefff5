"""Bundles: made by a run, verified, tampered with, unpacked safely, and run on a "device" — a fresh
virtual environment with only numpy, onnxruntime and tokenizers."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import recipe_text

STEPS = "  - uses: export-onnx\n  - uses: quantize-onnx\n"
BUNDLE = "bundle: {formats: [onnx, ort], tar: true}\n"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_text_model, sst2_small):
    from compressor.testing import run_recipe

    tmp = tmp_path_factory.mktemp("bundle-text")
    record = run_recipe(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], STEPS) + BUNDLE, tmp,
                        cache=tmp / "cache")
    return tmp / "run", record


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _verify(cli_run, path: Path) -> tuple[int, str]:
    code, out, err = cli_run("verify", str(path))
    return code, out + err


def test_run_writes_verified_bundles(text_run, cli_run):
    run, record = text_run
    for name in ("bundle", "bundle-ort", "bundle.tar.gz", "bundle-ort.tar.gz"):
        code, text = _verify(cli_run, run / name)
        assert code == 0 and "golden outputs within tolerance" in text, (name, text)
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["labels"] == ["negative", "positive"] and manifest["task"] == "text-classification"
    assert manifest["model"]["opset"] == 17 and manifest["min_onnxruntime"] == "1.13"
    assert [i["name"] for i in manifest["model"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["metrics"]["accuracy"] == record["artifacts"][-1]["accuracy"]
    assert manifest["recipe_hash"] == record["recipe_hash"] and len(manifest["golden"]) == 4
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json", "predict.py", "serve.py", "labels.py", "README.md"}
    assert (run / "bundle-ort" / "required_operators.config").is_file()


def test_bundle_outputs_equal_the_evaluated_model(text_run):
    import numpy as np

    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_runner

    run, record = text_run
    texts = ["a gripping , beautifully made film .", "the plot is thin and the jokes fall flat ."]
    runner = load_runner(Artifact.load(Path(record["steps"][-1]["path"])), threads=1)
    expected = runner(runner.encode(texts))
    got = bundle_runtime.Predictor(run / "bundle").logits(texts)
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("tamper,words", [
    (lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:-1] + b"\0"), ["model.onnx", "sha256"]),
    (lambda b: (b / "tokenizer.json").unlink(), ["tokenizer.json: listed in the manifest but missing"]),
    (lambda b: (b / "notes.txt").write_text("hi"), ["notes.txt: not listed in the manifest"]),
    (lambda b: _edit_manifest(b, schema_version=99), ["unknown schema_version 99"]),
    (lambda b: _edit_manifest(b, labels="oops"), ["field 'labels'"]),
    (lambda b: (b / "manifest.json").write_text("{not json"), ["manifest.json: not valid JSON"]),
    (lambda b: _edit_golden(b), ["golden[0]: outputs differ"]),
    (lambda b: _edit_manifest(b, model={"file": "model.onnx", "inputs": [{"name": "ids"}]}), ["inputs", "differ"]),
])
def test_tampered_bundle_is_refused(text_run, cli_run, tmp_path, tamper, words):
    bundle = _copy(text_run[0] / "bundle", tmp_path)
    tamper(bundle)
    code, text = _verify(cli_run, bundle)
    assert code == 2, text
    assert all(w in text for w in words), text
    result = subprocess.run([sys.executable, str(bundle / "predict.py"), "--verify"], capture_output=True, text=True)
    assert result.returncode == 1 and all(w in result.stderr for w in words), result.stderr


def test_verify_on_another_cpu_class_says_so_and_applies_the_measured_tolerance(text_run, cli_run, tmp_path):
    """An int8 bundle records the int8 kernel class its golden outputs, metrics and settings come from.
    On a device of another class (here COMPRESSOR_CPU_CLASS, as under an emulator) verify says so and
    allows the difference measured between classes; beyond it, it refuses and says why."""
    from compressor.bundle.writer import OTHER_CLASS_TOLERANCE, SAME_CLASS_TOLERANCE
    from compressor.run.cpu import int8_kernel_class

    bundle = _copy(text_run[0] / "bundle", tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    here = int8_kernel_class()
    assert manifest["golden_on"]["int8_kernels"] == here and manifest["measured_on"]["int8_kernels"] == here
    assert "MatMulInteger" in manifest["integer_operators"]
    assert (manifest["tolerance"], manifest["tolerance_other_class"]) == (SAME_CLASS_TOLERANCE, OTHER_CLASS_TOLERANCE)
    other = {"COMPRESSOR_CPU_CLASS": "arm64-dotprod" if here != "arm64-dotprod" else "x86-avx2"}
    code, text = _verify(cli_run, bundle)
    assert code == 0 and "note:" not in text and f"tolerance {SAME_CLASS_TOLERANCE:g}" in text
    code, out, err = cli_run("verify", str(bundle), env=other)
    assert code == 0 and other["COMPRESSOR_CPU_CLASS"] in out and f"tolerance {OTHER_CLASS_TOLERANCE:g}" in out
    # a golden output off by more than the same-class tolerance but less than the other-class one
    _shift_golden(bundle, (SAME_CLASS_TOLERANCE + OTHER_CLASS_TOLERANCE) / 2)
    assert _verify(cli_run, bundle)[0] == 2
    assert cli_run("verify", str(bundle), env=other)[0] == 0
    _shift_golden(bundle, OTHER_CLASS_TOLERANCE)
    code, out, err = cli_run("verify", str(bundle), env=other)
    assert code == 2 and "unmeasured" in err and here in err, err


def _shift_golden(bundle: Path, by: float) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["golden"][0]["logits"] = [v + by for v in manifest["golden"][0]["logits"]]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(bundle: Path, **changes) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _edit_golden(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["golden"][0]["logits"] = [v + 1.0 for v in manifest["golden"][0]["logits"]]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _tar_with(path: Path, name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> Path:
    with tarfile.open(path, "w:gz") as fh:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        data = b"x"
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        fh.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize("name,kind,link,words", [
    ("../escape.txt", tarfile.REGTYPE, "", ["points outside the archive"]),
    ("/tmp/absolute.txt", tarfile.REGTYPE, "", ["points outside the archive"]),
    ("model.onnx", tarfile.SYMTYPE, "/etc/passwd", ["is a link"]),
    ("model.onnx", tarfile.LNKTYPE, "/etc/passwd", ["is a link"]),
    ("dev", tarfile.CHRTYPE, "", ["device or special file"]),
])
def test_unsafe_archives_are_refused(tmp_path, cli_run, name, kind, link, words):
    archive = _tar_with(tmp_path / "evil.tar.gz", name, kind, link)
    before = set(tmp_path.parent.iterdir())
    code, text = _verify(cli_run, archive)
    assert code == 2 and all(w in text for w in words), text
    assert set(tmp_path.parent.iterdir()) == before and not (tmp_path.parent / "escape.txt").exists()


def test_bundle_from_hf_run_is_refused(tmp_path, cli_run, tiny_text_model, sst2_small):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                "  - uses: finetune\n") + "bundle: {formats: [onnx]}\n")
    code, _, err = cli_run("check", str(path))
    assert code == 2 and "bundle.formats" in err and "export-onnx" in err


def test_export_ort_step_matches_onnx(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from compressor.testing import run_recipe

    record = run_recipe(recipe_text(tiny_text_model, None, sst2_small["eval"],
                                    "  - uses: export-onnx\n  - uses: export-ort\n"), tmp_path)
    assert record["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4
    assert record["artifacts"][2]["format"] == "ort"
    assert record["artifacts"][2]["accuracy"] == pytest.approx(record["artifacts"][1]["accuracy"], abs=0.006)
    assert (Path(record["steps"][1]["path"]) / "required_operators.config").is_file()


def test_fused_packed_model_bundles_for_onnx_and_ort(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    """The edge recipe's tail (fusion, int8 QAttention, uint8-packed int4 tables) ships in both bundle
    formats; the manifest asks for the onnxruntime that reads packed tables, and both bundles verify."""
    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.testing import run_recipe

    steps = ("  - uses: export-onnx\n  - uses: optimize-onnx\n  - uses: quantize-onnx\n"
             "    with: {op_types: [MatMul, Attention], per_channel: true}\n"
             "  - uses: quantize-onnx\n    with: {mode: int4, op_types: [Gather]}\n")
    record = run_recipe(recipe_text(tiny_text_model, None, sst2_small["eval"], steps)
                        + "bundle: {formats: [onnx, ort]}\n", tmp_path)
    run = tmp_path / "run"
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["min_onnxruntime"] == "1.22"
    for bundle in (run / "bundle", run / "bundle-ort"):
        assert bundle_runtime.verify(bundle)["golden"] == 4
    assert record["artifacts"][-1]["accuracy"] == pytest.approx(record["artifacts"][1]["accuracy"], abs=0.05)


def test_bundle_loads_an_unfused_residual_path_as_it_was_measured(tmp_path, compressor_cache, tiny_text_model,
                                                                   sst2_small):
    """optimize-onnx skip_layer_norm false: the manifest tells the bundle's runtime which onnxruntime fusion to
    leave off, and the bundle verifies against golden outputs computed that way."""
    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.testing import run_recipe

    steps = ("  - uses: export-onnx\n  - uses: optimize-onnx\n    with: {skip_layer_norm: false}\n"
             "  - uses: quantize-onnx\n    with: {op_types: [MatMul, Attention]}\n")
    run_recipe(recipe_text(tiny_text_model, None, sst2_small["eval"], steps) + "bundle: {formats: [onnx]}\n", tmp_path)
    bundle = tmp_path / "run" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert "SkipLayerNormalization" not in manifest["model"]["operators"]
    assert bundle_runtime.verify(bundle)["golden"] == 4


def test_token_classification_bundle(tmp_path, compressor_cache, tiny_token_model, conll_small, cli_run):
    """A trained NER model's bundle finds the entities the evaluator found: the bundle's entities, scored
    against the gold tags, give the entity F1 the record reports for the same artifact."""
    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.models.data import DataSource
    from compressor.tasks.token_classification import entity_spans
    from compressor.testing import run_recipe

    steps = "  - uses: finetune\n    with: {epochs: 4, learning_rate: 3.0e-3, batch_size: 16}\n" + STEPS
    record = run_recipe(recipe_text(tiny_token_model, conll_small["train"], conll_small["eval"], steps,
                                    task="token-classification", data_format="conll") + "bundle: {formats: [onnx]}\n",
                        tmp_path)
    bundle = tmp_path / "run" / "bundle"
    assert record["artifacts"][-1]["f1"] > 0.2  # the model finds entities, so the comparison below means something
    rows = DataSource("conll", {"eval": conll_small["eval"]}, "tokens", "ner_tags").load("eval")
    predictor = bundle_runtime.Predictor(bundle)
    tp = n_pred = n_gold = 0
    for i in range(0, len(rows), 32):  # the evaluator's batches, so that dynamic int8 sees the same padding
        chunk = rows[i:i + 32]
        for row, found in zip(chunk, predictor.predict([r.text for r in chunk])):
            predicted = {(e["start"], e["end"], e["type"]) for e in found}
            gold = entity_spans(row.label)
            tp, n_pred, n_gold = tp + len(predicted & gold), n_pred + len(predicted), n_gold + len(gold)
    f1 = 2 * tp / (n_pred + n_gold)
    assert f1 == pytest.approx(record["artifacts"][-1]["f1"], abs=1e-9)
    code, out, err = cli_run("predict", str(bundle), " ".join(rows[0].text))
    assert code == 0, err
    words = rows[0].text
    assert json.loads(out.splitlines()[0])["prediction"] == predictor.predict([words])[0]
    assert bundle_runtime.verify(bundle)["golden"] == 4


@pytest.mark.slow
def test_bundle_runs_in_a_clean_venv(text_run, tmp_path, cli_run, device_python):
    """The device proof: only numpy, onnxruntime and tokenizers installed; outputs equal compressor's."""
    python = device_python
    device = tmp_path / "device"
    shutil.copytree(text_run[0] / "bundle", device)
    texts = ["a gripping , beautifully made film .", "dull ."]
    verify = subprocess.run([str(python), "predict.py", "--verify"], cwd=device, capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stderr
    on_device = subprocess.run([str(python), "predict.py", *texts], cwd=device, capture_output=True, text=True,
                               timeout=120)
    assert on_device.returncode == 0, on_device.stderr
    code, ours, _ = cli_run("predict", str(text_run[0] / "bundle"), *texts)
    assert code == 0
    device_out = [json.loads(l)["prediction"] for l in on_device.stdout.splitlines()]
    host_out = [json.loads(l)["prediction"] for l in ours.splitlines()]
    assert [d["label"] for d in device_out] == [h["label"] for h in host_out]
    assert all(abs(d["score"] - h["score"]) < 1e-5 for d, h in zip(device_out, host_out))


def test_export_tensorrt_is_refused_before_any_work_without_a_gpu(tmp_path, cli_run, tiny_text_model, sst2_small):
    """Where no NVIDIA GPU or no tensorrt package is present, `check` says which, with exit 2."""
    from compressor.export.tensorrt import gpu_problem
    from conftest import recipe_text

    problem = gpu_problem()
    if problem is None:
        pytest.skip("this machine can build TensorRT engines; see test_tensorrt_engine_matches_onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                  "  - uses: export-onnx\n  - uses: export-tensorrt\n"))
    code, _, err = cli_run("check", str(recipe))
    assert code == 2 and "steps[1] (export-tensorrt)" in err and problem in err


def test_tensorrt_engine_matches_onnx(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    """On a GPU machine: an fp16 engine's accuracy matches the ONNX model's on the same rows."""
    from compressor.export.tensorrt import gpu_problem
    from compressor.testing import run_recipe
    from conftest import recipe_text

    problem = gpu_problem()
    if problem:
        pytest.skip(f"TensorRT cannot run here: {problem}")
    record = run_recipe(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                    "  - uses: export-onnx\n  - uses: export-tensorrt\n"), tmp_path)
    onnx, engine = record["artifacts"][1], record["artifacts"][2]
    assert engine["format"] == "engine" and abs(engine["accuracy"] - onnx["accuracy"]) <= 0.02
