"""Bad recipes: each fails in `compressor check` with exit 2, one located message and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import recipe_text

GOOD_STEPS = "  - uses: finetune\n    with: {epochs: 1}\n  - uses: export-onnx\n  - uses: quantize-onnx\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def good(tiny_text_model: Path, sst2_small: dict[str, Path]) -> str:
    return recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], GOOD_STEPS)


def test_good_recipe_checks(tmp_path, cli_run, good):
    code, out, err = cli_run("check", str(_write(tmp_path, good)))
    assert code == 0, err
    assert "finetune" in out and "hf → onnx" in out and "ok: the recipe is valid" in out


# (name, transform of the good recipe text, --set overrides, words the message must contain)
CASES = [
    ("not yaml", lambda t: "version: 1\nname: [oops\nsteps: x\n", [], ["not valid YAML", "recipe.yaml:"]),
    ("a list", lambda t: "- uses: finetune\n- uses: export-onnx\n", [], ["must be a mapping", "not a list"]),
    ("empty", lambda t: "", [], ["the recipe is empty"]),
    ("only a comment", lambda t: "# nothing\n", [], ["the recipe is empty"]),
    ("wrong version", lambda t: t.replace("version: 1", "version: 2"), [], ["version", "1"]),
    ("bad name", lambda t: t.replace("name: test", "name: 'a b/c'"), [], ["name", "pattern"]),
    ("unknown top key", lambda t: t + "colour: blue\n", [], ["colour: unknown key"]),
    ("unknown model key", lambda t: t.replace("task:", "tsk: x, task:"), [], ["model.tsk: unknown key"]),
    ("bad task", lambda t: t.replace("task: text-classification", "task: translation"), [], ["model.task"]),
    ("missing model", lambda t: t.replace("model: {", "modl: {"), [], ["model: is required"]),
    ("no steps", lambda t: t.split("steps:")[0] + "steps: []\n", [], ["steps", "at least 1"]),
    ("step not a mapping", lambda t: t.replace("  - uses: export-onnx\n", "  - export-onnx\n"), [], ["steps[1]"]),
    ("wrong type", lambda t: t.replace("epochs: 1", "epochs: many"), [],
     ["steps[0] (finetune).with.epochs", "integer"]),
    ("out of range", lambda t: t.replace("epochs: 1", "epochs: 0"), [],
     ["steps[0] (finetune).with.epochs", "greater than or equal to 1"]),
    ("unknown step key", lambda t: t.replace("epochs: 1", "epochz: 1"), [],
     ["steps[0] (finetune).with.epochz: unknown key"]),
    ("misspelled step", lambda t: t.replace("uses: finetune", "uses: finetun"), [],
     ["unknown step 'finetun'", "did you mean 'finetune'"]),
    ("unknown step", lambda t: t.replace("uses: finetune", "uses: sparsify-magic"), [],
     ["unknown step 'sparsify-magic'", "compressor steps"]),
    ("format chain", lambda t: t.replace("  - uses: export-onnx\n", ""), [],
     ["steps[1] (quantize-onnx)", "needs an onnx model", "export-onnx"]),
    ("onnx step twice in hf", lambda t: t.replace("  - uses: finetune\n    with: {epochs: 1}\n  - uses: export-onnx\n",
                                                  "  - uses: export-onnx\n  - uses: finetune\n"), [],
     ["steps[1] (finetune)", "needs a hf model"]),
    ("missing model dir", lambda t: t.replace("path: /", "path: /nonexistent/"), [],
     ["model.path", "does not exist"]),
    ("missing data", lambda t: t.replace("train.tsv", "trian.tsv"), [], ["data.train", "does not exist"]),
    ("no data for finetune", lambda t: t.split("data:")[0] + "steps:" + t.split("steps:")[1], [],
     ["steps[0] (finetune)", "needs train data"]),
    ("missing column", lambda t: t.replace("format: tsv", "format: tsv\n  text: sentense"), [],
     ["column 'sentense'", "data.text"]),
    ("bad data format", lambda t: t.replace("format: tsv", "format: xlsx"), [], ["data.format"]),
    ("negative seed", lambda t: t + "seed: -1\n", [], ["seed", "greater than or equal to 0"]),
    ("bad guard", lambda t: t + "guard: {max_accuracy_drop: 5}\n", [], ["guard.max_accuracy_drop"]),
    ("bad latency", lambda t: t.replace("runs: 5", "runs: 0"), [], ["evaluate.latency.runs"]),
    ("bad bundle format", lambda t: t + "bundle: {formats: [zip]}\n", [], ["bundle.formats[0]"]),
    ("set out of range", lambda t: t, ["steps.7.with.epochs=2"], ["index 7 is not in a list of 3"]),
    ("set without =", lambda t: t, ["steps.0.with.epochs"], ["has no '='"]),
    ("set wrong type", lambda t: t, ["steps.0.with.epochs=lots"], ["steps[0] (finetune).with.epochs"]),
    ("set unknown key", lambda t: t, ["steps.0.with.colour=red"], ["steps[0] (finetune).with.colour: unknown key"]),
]


@pytest.mark.parametrize("name,transform,overrides,words", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe(tmp_path, cli_run, good, name, transform, overrides, words):
    path = _write(tmp_path, transform(good))
    args = ["check", str(path)] + [a for o in overrides for a in ("--set", o)]
    code, out, err = cli_run(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_labels_the_model_does_not_have(tmp_path, cli_run, tiny_text_model, sst2_small):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film \t1\nbad film \t2\n", encoding="utf-8")
    code, _, err = cli_run("check", str(_write(tmp_path, recipe_text(tiny_text_model, sst2_small["train"], bad,
                                                                     GOOD_STEPS))))
    assert code == 2
    assert "data.eval" in err and "labels the model does not have: 2" in err


def test_non_utf8_data(tmp_path, cli_run, tiny_text_model, sst2_small):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("sentence\tlabel\nun film tr\xe8s bon \t1\n".encode("latin-1"))
    code, _, err = cli_run("check", str(_write(tmp_path, recipe_text(tiny_text_model, bad, sst2_small["eval"],
                                                                     GOOD_STEPS))))
    assert code == 2 and "is not UTF-8" in err


def test_model_without_config_or_with_pickle(tmp_path, cli_run, sst2_small):
    model = tmp_path / "model"
    model.mkdir()
    text = recipe_text(model, sst2_small["train"], sst2_small["eval"], GOOD_STEPS)
    code, _, err = cli_run("check", str(_write(tmp_path, text)))
    assert code == 2 and "has no config.json" in err
    (model / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, _, err = cli_run("check", str(_write(tmp_path, text)))
    assert code == 2 and "pickled weights" in err


def test_several_problems_are_listed_together(tmp_path, cli_run, good):
    text = good.replace("epochs: 1", "epochs: 0").replace("uses: quantize-onnx", "uses: quantise-onnx")
    code, _, err = cli_run("check", str(_write(tmp_path, text)))
    assert code == 2
    assert "2 problems" in err and "steps[0] (finetune).with.epochs" in err and "quantise-onnx" in err


def test_override_changes_the_plan(tmp_path, cli_run, good):
    code, out, _ = cli_run("check", str(_write(tmp_path, good)), "--set", "steps.0.with.epochs=3")
    assert code == 0 and '"epochs": 3' in out


def test_missing_recipe_file(tmp_path, cli_run):
    code, _, err = cli_run("check", str(tmp_path / "nope.yaml"))
    assert code == 2 and "does not exist" in err
