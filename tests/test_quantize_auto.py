"""quantize-onnx mode: auto on a tiny classifier made to break under one scale per tensor: one output
channel of the pooler's dense layer is scaled up 1000× (its tanh saturates, and the classifier's weights
for that channel are zeroed, so the float model hardly changes), so one int8 scale for the whole weight
crushes every other channel while one scale per channel does not. The search must see the damage on
the tuning rows, move on, record every candidate, and end within budget, or keep the best and let the
guard fail (exit 1, everything written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import FLOAT_STEPS, recipe_text

SCALE = 1000.0


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, trained_tiny, sst2_small):
    """(onnx model directory with the scaled pooler channel, name of the damaged node, data slices)."""
    import onnx
    from onnx import numpy_helper

    tmp = tmp_path_factory.mktemp("auto")
    record = trained_tiny["record"]
    export = Path(record["steps"][1]["path"])
    model_dir = tmp / "scaled"
    shutil.copytree(export, model_dir)
    (model_dir / "artifact.json").unlink()
    model = onnx.load(str(model_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    pooler = next(n for n in model.graph.node if n.op_type == "Gemm" and "pooler" in n.name)
    classifier = next(n for n in model.graph.node if n.op_type == "Gemm" and "classifier" in n.name)
    channel = 3

    def edit(node, fn) -> None:  # fn(weight as [in, out]) edits it in place
        name = node.input[1]
        array = numpy_helper.to_array(inits[name]).copy()
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        fn(array.T if transposed else array)
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    edit(pooler, lambda w: w.__setitem__((slice(None), channel), w[:, channel] * SCALE))
    edit(classifier, lambda w: w.__setitem__(channel, 0.0))
    onnx.save(model, str(model_dir / "model.onnx"))
    return {"model": model_dir, "node": pooler.name + "_MatMul", "data": sst2_small, "tmp": tmp}


def _recipe(damaged, tmp_path: Path, quantize: str, guard: str = "") -> Path:
    from compressor.testing import write_tsv_slice, shared_data_dir

    validation = write_tsv_slice(shared_data_dir() / "sst2" / "train.tsv", tmp_path / "validation.tsv", 300,
                                 skip=5000)  # rows the tiny model was not trained on, not the eval rows
    text = recipe_text(damaged["model"], None, damaged["data"]["eval"], f"  - uses: quantize-onnx\n    with: {quantize}\n",
                       extra=guard)
    text = text.replace("  eval:", f"  validation: {validation}\n  eval:")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _search(record: dict) -> dict:
    return record["steps"][0]["notes"]["search"]


def test_search_moves_past_a_damaging_candidate(damaged, tmp_path, compressor_cache):
    """int8 per tensor loses more than the budget on the tuning rows; the search records it, moves on and
    stops at the first candidate within the budget; the eval accuracy then stays close to the float model's."""
    from compressor.host import build_host
    from compressor.run.pipeline import run_plan
    from compressor.recipe.plan import build_plan

    path = _recipe(damaged, tmp_path, "{mode: auto, max_accuracy_drop: 0.02}")
    host = build_host()
    run_plan(build_plan(path, host), host, tmp_path / "run", log=lambda s: None)
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    found = _search(record)
    first, *rest = found["candidates"]
    assert first["name"] == "int8 per-tensor" and not first["within_budget"]
    assert first["change"] < -0.02 and first["metric"] == pytest.approx(found["reference"] + first["change"])
    assert rest and rest[-1]["within_budget"] and not any(c["within_budget"] for c in rest[:-1])
    assert found["chosen"] == rest[-1]["name"] and found["within_budget"] is True
    assert found["tuning_rows"] == 300 and "data.validation" in found["tuning_source"]
    assert found["cpu"]["int8_kernels"] == record["environment"]["int8_kernels"]
    float_acc, final = record["artifacts"][0]["accuracy"], record["artifacts"][1]["accuracy"]
    assert abs(final - float_acc) <= 0.04
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Settings search" in report and f"| {found['chosen']} **(chosen)** |" in report
    assert all(c["name"] in report for c in found["candidates"])


def test_sensitive_node_is_measured_and_left_float(damaged, tmp_path, compressor_cache, monkeypatch):
    """With per-tensor int8 as the only base candidate, the measured sensitivity ranks the scaled pooler
    layer first, and leaving it in float brings the model within budget."""
    from compressor.host import build_host
    from compressor.run.pipeline import run_plan
    from compressor.recipe.plan import build_plan
    from compressor.plugins.quantize_onnx import tune as quantize_tune

    monkeypatch.setattr(quantize_tune, "base_candidates", lambda: [quantize_tune.Candidate("int8 per-tensor", "int8",
                                                                                          False)])
    path = _recipe(damaged, tmp_path, "{mode: auto, max_accuracy_drop: 0.02, max_excluded: 3}")
    host = build_host()
    run_plan(build_plan(path, host), host, tmp_path / "run", log=lambda s: None)
    found = _search(json.loads((tmp_path / "run" / "record.json").read_text()))
    assert next(iter(found["sensitivity"])) == damaged["node"]
    chosen = next(c for c in found["candidates"] if c["name"] == found["chosen"])
    assert chosen["within_budget"] and chosen["excluded"][0] == damaged["node"]
    assert chosen["size_bytes"] > found["candidates"][0]["size_bytes"]  # a float node costs size


def test_nothing_within_budget_keeps_the_best_and_the_guard_fails(damaged, tmp_path, cli_run, monkeypatch):
    """Only damaging candidates and no exclusions: the search keeps the most accurate, says so, and the
    guard fails the run with exit 1, with the record, the report and the artifact written."""
    from compressor.plugins.quantize_onnx import tune as quantize_tune

    monkeypatch.setattr(quantize_tune, "base_candidates", lambda: [
        quantize_tune.Candidate("int8 per-tensor", "int8", False),
        quantize_tune.Candidate("int8 per-tensor, reduce_range", "int8", False, True)])
    path = _recipe(damaged, tmp_path, "{mode: auto, max_excluded: 0}", guard="guard: {max_accuracy_drop: 0.02}\n")
    code, _, err = cli_run("run", str(path), "--out", str(tmp_path / "run"))
    assert code == 1, err
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    found = _search(record)
    assert record["status"] == "guard_failed" and found["within_budget"] is False
    assert found["budget"] == 0.02  # taken from the guard
    assert len(found["candidates"]) == 2 and "no candidate was within the budget" in found["reason"]
    best = max(found["candidates"], key=lambda c: c["metric"])
    assert found["chosen"] == best["name"]
    assert (Path(record["steps"][0]["path"]) / "model.onnx").is_file()
    assert (tmp_path / "run" / "report.html").is_file() and "Settings search" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("data,guard,words", [
    ("", "guard: {max_accuracy_drop: 0.01}\n", ["needs tuning rows", "data.validation", "data.holdout"]),
    ("  holdout: 50\n", "", ["mode: auto needs an accuracy budget", "with.max_accuracy_drop"]),
    ("  holdout_from: sentences\n", "guard: {max_accuracy_drop: 0.01}\n",
     ["data.holdout_from", "it needs data.holdout", "remove holdout_from"]),
])
def test_auto_needs_tuning_rows_and_a_budget(tmp_path, cli_run, tiny_encoder, sst2_small, data, guard, words):
    text = recipe_text(tiny_encoder, sst2_small["train"], sst2_small["eval"],
                       FLOAT_STEPS + "  - uses: quantize-onnx\n    with: {mode: auto}\n", extra=guard,
                       labels=", labels: [negative, positive]")
    text = text.replace("  eval:", data + "  eval:")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, _, err = cli_run("check", str(path))
    assert code == 2 and all(w in err for w in words), err


def test_holdout_rows_are_left_out_of_training(tmp_path, sst2_small):
    """data.holdout: the tuning rows are seeded, disjoint from what `train` gives every other step, and the
    two together are the train file."""
    from compressor.models.data import DataSource

    source = DataSource("tsv", {"train": sst2_small["train"]}, "sentence", "label", holdout=150, seed=7)
    train, tune = source.load("train"), source.load("tune")
    everything = DataSource("tsv", {"train": sst2_small["train"]}, "sentence", "label").load("train")
    assert len(tune) == 150 and len(train) == len(everything) - 150
    assert sorted(map(repr, train + tune)) == sorted(map(repr, everything))
    again = DataSource("tsv", {"train": sst2_small["train"]}, "sentence", "label", holdout=150, seed=7)
    assert again.load("tune") == tune and again.digest() == source.digest()
    assert DataSource("tsv", {"train": sst2_small["train"]}, "sentence", "label", holdout=150,
                      seed=8).load("tune") != tune


def test_holdout_sentences_hold_out_whole_sentences_and_none_of_their_phrases(tmp_path):
    """data.holdout_from: sentences: the tuning rows are rows no other row contains, word for word, and train
    keeps every row except them and their phrases ("film" is a phrase of two sentences; "filmmaker" of none)."""
    from compressor.models.data import DataSource

    rows = ["a gorgeous , witty film", "gorgeous , witty", "witty", "a dull mess", "dull", "the best film of the year",
            "film", "filmmaker", "of the year", "a thin , dull plot", "thin"]
    train_file = tmp_path / "train.tsv"
    train_file.write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
    whole = {"a gorgeous , witty film", "a dull mess", "the best film of the year", "filmmaker", "a thin , dull plot"}
    tunes = []
    for seed in range(6):
        source = DataSource("tsv", {"train": train_file}, "sentence", "label", holdout=2, seed=seed,
                            holdout_from="sentences")
        train, tune = source.load("train"), source.load("tune")
        held = [r.text for r in tune]
        assert len(held) == 2 and set(held) <= whole
        phrases = {r for r in rows if any(f" {r} " in f" {h} " for h in held)}
        assert sorted(r.text for r in train) == sorted(set(rows) - phrases)
        tunes.append(tuple(held))
    assert len(set(tunes)) > 1  # the seed chooses
    by_rows = DataSource("tsv", {"train": train_file}, "sentence", "label", holdout=2, seed=0)
    assert by_rows.digest() != source.digest()
    too_many = DataSource("tsv", {"train": train_file}, "sentence", "label", holdout=6, seed=0,
                          holdout_from="sentences")
    with pytest.raises(Exception, match="only 5 rows that no other row contains"):
        too_many.load("tune")
