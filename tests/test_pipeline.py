"""End to end on a tiny BERT and real SST-2 rows: finetune → export-onnx → quantize-onnx.

Checks values, not that it ran: accuracy learned, ONNX parity, int8 within a bound, the input
model untouched, the record's hash chain, the reports, and the cache doing the work once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.models.artifact import hash_dir
from conftest import recipe_text

STEPS = ("  - uses: finetune\n    with: {epochs: 3, learning_rate: 2.0e-3, batch_size: 32}\n"
         "  - uses: export-onnx\n  - uses: quantize-onnx\n")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_encoder, sst2_small):
    """One real run of the tiny recipe, shared by the tests of this module."""
    from compressor.testing import run_recipe

    tmp = tmp_path_factory.mktemp("run")
    before = hash_dir(tiny_encoder)
    text = recipe_text(tiny_encoder, sst2_small["train"], sst2_small["eval"], STEPS,
                       labels=", labels: [negative, positive]") + "bundle: {formats: [onnx]}\n"
    record = run_recipe(text, tmp, cache=tmp / "cache")
    return {"record": record, "dir": tmp / "run", "tmp": tmp, "text": text, "before": before,
            "model": tiny_encoder}


def _rows(record):
    return {a["name"]: a for a in record["artifacts"]}


def test_input_model_is_untouched(tiny_run):
    assert hash_dir(tiny_run["model"]) == tiny_run["before"]
    assert tiny_run["record"]["artifacts"][0]["hash"] == tiny_run["before"]


def test_finetune_learns(tiny_run):
    rows = _rows(tiny_run["record"])
    assert "accuracy" not in rows["input"]  # a bare encoder has no head to measure
    assert rows["finetune"]["accuracy"] > 0.6  # chance is 0.5 on this dev slice
    notes = tiny_run["record"]["steps"][0]["notes"]
    assert notes["trained_parameters"] == notes["total_parameters"]
    assert notes["train_rows"] == 2000


def test_onnx_matches_pytorch(tiny_run):
    rows = _rows(tiny_run["record"])
    assert tiny_run["record"]["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4
    assert rows["export-onnx"]["accuracy"] == pytest.approx(rows["finetune"]["accuracy"], abs=0.006)


def test_int8_accuracy_and_size(tiny_run):
    rows = _rows(tiny_run["record"])
    assert abs(rows["quantize-onnx"]["accuracy"] - rows["export-onnx"]["accuracy"]) <= 0.03
    assert rows["quantize-onnx"]["size_bytes"] < rows["export-onnx"]["size_bytes"] / 2


def test_record_chains_hashes_and_versions(tiny_run):
    record = tiny_run["record"]
    steps = record["steps"]
    assert steps[0]["input_hash"] == tiny_run["before"]
    for prev, nxt in zip(steps, steps[1:]):
        assert nxt["input_hash"] == prev["output_hash"]
    for step in steps:
        assert hash_dir(Path(step["path"])) == step["output_hash"]
    assert len(record["recipe_hash"]) == 64 and record["seed"] == 0 and record["data_hash"]
    assert {"torch", "transformers", "onnxruntime", "onnxruntime-genai"} <= set(record["environment"]["libraries"])
    assert record["status"] == "ok"
    assert any(p["name"] == "finetune" for p in record["plugins"])


def test_reports(tiny_run):
    run = tiny_run["dir"]
    report = json.loads((run / "report.json").read_text())
    assert [r["artifact"] for r in report["rows"]] == ["input", "finetune", "export-onnx", "quantize-onnx"]
    final = report["rows"][-1]
    assert final["x_smaller"] > 2 and final["p50_ms"] > 0 and final["throughput"] > 0
    md = (run / "report.md").read_text()
    assert "| 3 | quantize-onnx | onnx |" in md and "×smaller" in md
    assert f"{final['metric']:.4f}" in md


def test_bundle_checksums(tiny_run):
    from compressor.models.artifact import hash_file

    bundle = tiny_run["dir"] / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["labels"] == ["negative", "positive"]
    for name, entry in manifest["files"].items():
        assert hash_file(bundle / name) == entry["sha256"]
    assert "model.onnx" in manifest["files"] and "tokenizer.json" in manifest["files"]


def test_second_run_comes_from_the_cache(tiny_run):
    from compressor.testing import run_recipe

    tmp = tiny_run["tmp"] / "again"
    tmp.mkdir()
    record = run_recipe(tiny_run["text"], tmp, cache=tiny_run["tmp"] / "cache")
    first = tiny_run["record"]
    assert [s["cached"] for s in record["steps"]] == [True, True, True]
    assert [s["output_hash"] for s in record["steps"]] == [s["output_hash"] for s in first["steps"]]
    assert [a.get("accuracy") for a in record["artifacts"]] == [a.get("accuracy") for a in first["artifacts"]]


def test_changed_config_reruns_only_from_that_step(tiny_run):
    from compressor.testing import run_recipe

    tmp = tiny_run["tmp"] / "changed"
    tmp.mkdir()
    record = run_recipe(tiny_run["text"], tmp, overrides=["steps.2.with.per_channel=true"],
                        cache=tiny_run["tmp"] / "cache")
    assert [s["cached"] for s in record["steps"]] == [True, True, False]
    assert record["steps"][2]["output_hash"] != tiny_run["record"]["steps"][2]["output_hash"]
