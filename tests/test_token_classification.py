"""Token classification: CoNLL-style entity F1, and a tiny NER model on real CoNLL-2003 rows
through finetune → export-onnx → optimize-onnx → quantize-onnx."""

from __future__ import annotations

import pytest

from compressor.tasks.token_classification import entity_f1, entity_spans
from conftest import recipe_text


def test_entity_spans_iob2_and_iob1():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 2, "PER"), (3, 4, "LOC")}
    # conlleval: an I- tag after O or after another type opens an entity
    assert entity_spans(["O", "I-ORG", "I-ORG", "I-LOC"]) == {(1, 3, "ORG"), (3, 4, "LOC")}
    assert entity_spans(["B-PER", "B-PER"]) == {(0, 1, "PER"), (1, 2, "PER")}


def test_entity_f1_values():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-MISC"]]
    score = entity_f1(gold, pred)
    assert score["precision"] == pytest.approx(2 / 3)
    assert score["recall"] == pytest.approx(2 / 3)
    assert score["f1"] == pytest.approx(2 / 3)
    assert entity_f1(gold, gold)["f1"] == 1.0
    assert entity_f1(gold, [["O"] * 4, ["O"] * 2])["f1"] == 0.0


def test_conll_reader_counts(tmp_path):
    from compressor.models.data import DataSource
    from compressor.testing import shared_data_dir

    src = DataSource("conll", {"eval": shared_data_dir() / "conll2003" / "valid.txt"}, "tokens", "tags")
    rows = src.load("eval")
    assert len(rows) == 3250  # the README's count, -DOCSTART- excluded
    assert sum(len(r.text) for r in rows) == 51362
    assert rows[0].text[:2] == ["CRICKET", "-"]


def test_tiny_ner_pipeline(tmp_path, compressor_cache, tiny_token_model, conll_small):
    from compressor.testing import run_recipe

    steps = ("  - uses: finetune\n    with: {epochs: 4, learning_rate: 3.0e-3, batch_size: 16}\n"
             "  - uses: export-onnx\n  - uses: optimize-onnx\n"
             "  - uses: quantize-onnx\n    with: {mode: auto, max_accuracy_drop: 0.05}\n")
    text = recipe_text(tiny_token_model, conll_small["train"], conll_small["eval"], steps,
                       task="token-classification", data_format="conll", data_extra="  holdout: 100\n")
    record = run_recipe(text, tmp_path)
    # the int8 search scores entity F1 on the 100 held-out sentences, and stops at the first within budget
    found = record["steps"][3]["notes"]["search"]
    assert found["metric"] == "f1" and found["tuning_rows"] == 100 and found["budget"] == 0.05
    chosen = next(c for c in found["candidates"] if c["name"] == found["chosen"])
    assert chosen["within_budget"] and chosen["change"] >= -0.05 and found["candidates"][-1] == chosen
    rows = {a["name"]: a for a in record["artifacts"]}
    assert rows["input"]["f1"] < 0.05  # an untrained head finds no entities
    assert rows["finetune"]["f1"] > 0.2
    assert rows["export-onnx"]["f1"] == pytest.approx(rows["finetune"]["f1"], abs=0.005)
    assert rows["optimize-onnx"]["f1"] == pytest.approx(rows["export-onnx"]["f1"], abs=0.005)
    assert abs(rows["quantize-onnx"]["f1"] - rows["export-onnx"]["f1"]) < 0.05
    assert record["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4
    assert record["steps"][2]["notes"]["fused"]["Attention"] == 2  # the same fusions on a token-tagging graph
