"""`finetune` methods on a tiny classifier: what is trained is what the method promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load_file

from conftest import recipe_text


def _run(tmp_path, model, data, with_: str):
    from compressor.testing import run_recipe

    tmp_path.mkdir(parents=True, exist_ok=True)

    text = recipe_text(model, data["train"], data["eval"], f"  - uses: finetune\n    with: {{{with_}}}\n")
    return run_recipe(text, tmp_path)


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("method", ["head", "bitfit"])
def test_partial_methods_train_only_their_parameters(tmp_path, compressor_cache, tiny_text_model, sst2_small, method):
    record = _run(tmp_path, tiny_text_model, sst2_small,
                  f"method: {method}, max_train_rows: 256, learning_rate: 1.0e-2, epochs: 1")
    before, after = _weights(tiny_text_model), _weights(Path(record["steps"][0]["path"]))
    changed = {k for k in before if not (before[k] == after[k]).all()}
    head = {k for k in before if k.startswith("classifier.")}
    biases = {k for k in before if k.endswith(".bias")}
    if method == "head":
        assert changed == head
    else:
        assert head <= changed <= head | biases and len(changed & biases) > len(head)
    notes = record["steps"][0]["notes"]
    expected = sum(before[k].size for k in (head if method == "head" else head | biases))
    assert notes["trained_parameters"] <= expected and notes["trained_parameters"] >= sum(before[k].size for k in head)
    assert notes["train_rows"] == 256


def test_lora_saves_adapter_and_merges(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    record = _run(tmp_path, tiny_text_model, sst2_small,
                  "method: lora, lora_r: 4, max_train_rows: 256, learning_rate: 1.0e-2")
    out = Path(record["steps"][0]["path"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    notes = record["steps"][0]["notes"]
    assert 0 < notes["trained_parameters"] < notes["total_parameters"] / 3
    before, after = _weights(tiny_text_model), _weights(out)
    assert set(before) == set(after)  # merged: plain transformers weights, no lora_ keys
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert any("attention.self.query.weight" in k for k in changed)
    assert record["artifacts"][1]["accuracy"] is not None


def test_finetune_is_deterministic(tmp_path, monkeypatch, tiny_text_model, sst2_small):
    """Two runs with separate caches (so nothing is reused) give byte-identical models."""
    from compressor.testing import run_recipe

    text = recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                       "  - uses: finetune\n    with: {max_train_rows: 128}\n")
    hashes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / name / "cache"))
        record = run_recipe(text, tmp_path / name)
        assert record["steps"][0]["cached"] is False
        hashes.append(record["steps"][0]["output_hash"])
    assert hashes[0] == hashes[1]


def test_lora_without_merge_keeps_the_base_weights(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    """merge: false saves the untouched base plus adapter/; evaluation applies the adapter."""
    record = _run(tmp_path, tiny_text_model, sst2_small,
                  "method: lora, lora_r: 4, max_train_rows: 256, learning_rate: 1.0e-2, merge: false")
    out = Path(record["steps"][0]["path"])
    before, after = _weights(tiny_text_model), _weights(out)
    assert set(before) == set(after)
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed <= {"classifier.weight", "classifier.bias"}, changed  # no LoRA merged into the encoder
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = _run(tmp_path / "merged", tiny_text_model, sst2_small,
                  "method: lora, lora_r: 4, max_train_rows: 256, learning_rate: 1.0e-2, merge: true")
    assert record["artifacts"][1]["accuracy"] == merged["artifacts"][1]["accuracy"]
