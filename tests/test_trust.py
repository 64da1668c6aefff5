"""Runs a user can trust: caches keyed on what changes their content (library versions, the CPU that
measured), sweeps checked like recipes, no side effects on the calling process, one source of truth
for thread counts, input lengths and tokenizer files."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from conftest import recipe_text

EXPORT = "  - uses: export-onnx\n"


def _run(tmp_path: Path, text: str, name: str, environment=None, monkeypatch=None) -> tuple[dict, list[str]]:
    """Run a recipe in-process; with `environment`, Runner sees that environment instead of this machine's."""
    from compressor.host import build_host
    from compressor.run.pipeline import run_plan
    from compressor.recipe.plan import build_plan

    if environment is not None:
        monkeypatch.setattr("compressor.run.pipeline.environment", lambda: environment)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    lines: list[str] = []
    host = build_host()
    run_plan(build_plan(recipe, host), host, tmp_path / name, log=lines.append)
    return json.loads((tmp_path / name / "record.json").read_text()), lines


def test_a_library_upgrade_reruns_the_steps(tmp_path, compressor_cache, tiny_text_model, sst2_small, monkeypatch):
    from compressor.run.record import environment

    text = recipe_text(tiny_text_model, None, sst2_small["eval"], EXPORT)
    first, _ = _run(tmp_path, text, "first")
    again, _ = _run(tmp_path, text, "again")
    assert [s["cached"] for s in again["steps"]] == [True]
    env = environment()
    env["libraries"] = {**env["libraries"], "onnxruntime": "99.0.0"}
    upgraded, _ = _run(tmp_path, text, "upgraded", env, monkeypatch)
    assert [s["cached"] for s in upgraded["steps"]] == [False]
    assert upgraded["steps"][0]["cache_key"] != first["steps"][0]["cache_key"]


def test_measurements_are_not_shared_between_cpus(tmp_path, compressor_cache, tiny_text_model, sst2_small,
                                                 monkeypatch):
    """A cache shared by machines (Ray on a shared filesystem): another CPU class reuses the artifacts, but
    measures them itself."""
    from compressor.run.record import environment

    text = recipe_text(tiny_text_model, None, sst2_small["eval"], EXPORT)
    _, lines = _run(tmp_path, text, "here")
    assert sum("measuring" in line for line in lines) == 2
    _, lines = _run(tmp_path, text, "again")
    assert not any("measuring" in line for line in lines)
    other = {**environment(), "cpu": "Some Other CPU", "int8_kernels": "arm64-dotprod"}
    record, lines = _run(tmp_path, text, "other", other, monkeypatch)
    assert [s["cached"] for s in record["steps"]] == [True]
    assert sum("measuring" in line for line in lines) == 2 and record["environment"]["cpu"] == "Some Other CPU"


@pytest.mark.parametrize("steps,bundle,words", [
    ("  - uses: prune\n    with: {ratio: \"${{ matrix.r }}\"}\n", "bundle: {formats: [onnx]}\n",
     ["bundle.formats", "last step gives hf", "export-onnx"]),
    (EXPORT + "  - uses: quantize-onnx\n    with: {per_channel: \"${{ matrix.r }}\"}\n", "bundle: {formats: [zip]}\n",
     ["bundle.formats", "zip"]),
])
def test_a_sweeps_bundle_is_checked(tmp_path, cli_run, tiny_text_model, sst2_small, steps, bundle, words):
    matrix = "matrix: {r: [0.25, 0.5]}\n" if "prune" in steps else "matrix: {r: [false, true]}\n"
    path = tmp_path / "sweep.yaml"
    path.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], steps) + bundle + matrix)
    code, _, err = cli_run("check", str(path))
    assert code == 2 and all(w in err for w in words), err


def test_no_side_effects_on_the_callers_logging_and_warnings(tmp_path, compressor_cache, tiny_text_model,
                                                            sst2_small, cli_run):
    import onnxruntime.quantization  # noqa: F401 - libraries may register filters when first imported;
    import transformers  # noqa: F401      what is checked is what compressor itself leaves behind

    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("transformers").level)
    filters = list(warnings.filters)
    steps = EXPORT + "  - uses: quantize-onnx\n    with: {op_types: [MatMul]}\n"
    _run(tmp_path, recipe_text(tiny_text_model, None, sst2_small["eval"], steps), "in-process")
    recipe = tmp_path / "cli.yaml"
    recipe.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"], steps + "  - uses: quantize-onnx\n"
                                  "    with: {mode: int4, op_types: [Gather]}\n"))
    code, _, err = cli_run("run", str(recipe), "--out", str(tmp_path / "cli"))
    assert code == 0, err
    assert (root.level, list(root.handlers), logging.getLogger("transformers").level) == before
    assert list(warnings.filters) == filters


def test_training_threads_are_apart_from_measurement_threads(tmp_path, compressor_cache, tiny_text_model,
                                                            sst2_small):
    from compressor.host import build_host
    from compressor.hookspecs import hookimpl
    from compressor.step import Step, StepConfig
    from compressor.testing import register_plugin, run_recipe

    seen: list[int] = []

    class Probe(Step):
        name, summary, Config = "probe-threads", "records the threads it is given", StepConfig

        def run(self, artifact, config, ctx):
            import shutil

            seen.append(ctx.threads)
            for f in artifact.path.iterdir():
                if f.is_file() and f.name != "artifact.json":
                    shutil.copy2(f, ctx.out_dir / f.name)
            return artifact.derive(ctx.out_dir)

    class Plugin:
        @hookimpl
        def register_steps(self, register):
            register(Probe)

    host = build_host()
    register_plugin(host, Plugin(), "probe")
    text = recipe_text(tiny_text_model, None, sst2_small["eval"], "  - uses: probe-threads\n")
    text = text.replace("evaluate: {latency: {", "threads: 1\nevaluate: {latency: {threads: 2, ")
    record = run_recipe(text, tmp_path / "one", host=host)
    assert seen == [1] and record["step_threads"] == 1 and record["evaluation"]["threads"] == 2
    record = run_recipe(text.replace("threads: 1\n", "threads: 2\n"), tmp_path / "two", host=host)
    assert seen == [1, 2] and record["steps"][0]["cached"] is False  # the thread count keys the step


def test_the_input_length_travels_with_the_artifact(tmp_path, compressor_cache, tiny_encoder, sst2_small):
    """finetune's max_length is what every later artifact is evaluated and bundled with."""
    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_runner
    from compressor.testing import run_recipe

    steps = "  - uses: finetune\n    with: {max_length: 12, max_train_rows: 64}\n" + EXPORT + "  - uses: quantize-onnx\n"
    record = run_recipe(recipe_text(tiny_encoder, sst2_small["train"], sst2_small["eval"], steps,
                                    labels=", labels: [negative, positive]") + "bundle: {formats: [onnx]}\n", tmp_path)
    for step in record["steps"]:
        assert Artifact.load(Path(step["path"])).max_length == 12
    runner = load_runner(Artifact.load(Path(record["steps"][-1]["path"])), threads=1)
    long_text = " ".join(["a gripping , beautifully made film ."] * 10)
    assert runner.encode([long_text])["input_ids"].shape[1] == 12
    manifest = json.loads((tmp_path / "run" / "bundle" / "manifest.json").read_text())
    assert manifest["tokenizer"]["max_length"] == 12


def test_every_tokenizer_file_check_accepts_is_carried_by_steps(tmp_path):
    """A model whose tokenizer is only `tokenizer.model` passes check, so hf → hf steps must copy it."""
    from compressor.models.artifact import TOKENIZER_FILES, TOKENIZER_VOCAB_FILES
    from compressor.models import copy_tokenizer

    assert set(TOKENIZER_VOCAB_FILES) <= set(TOKENIZER_FILES)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    copy_tokenizer(src, dst)
    assert (dst / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"


def test_a_step_reruns_only_when_the_data_it_reads_changes(tmp_path, compressor_cache, tiny_encoder, sst2_small):
    """finetune reads train: another eval file leaves it cached; other train rows, or other held-out rows,
    rerun it. `evaluate.split: tune` measures on the tuning rows instead of eval."""
    from compressor.testing import run_recipe, write_tsv_slice

    steps = "  - uses: finetune\n    with: {max_train_rows: 64, max_length: 16}\n" + EXPORT
    labels = ", labels: [negative, positive]"
    first = run_recipe(recipe_text(tiny_encoder, sst2_small["train"], sst2_small["eval"], steps, labels=labels),
                       tmp_path / "first")
    other_eval = write_tsv_slice(sst2_small["eval"], tmp_path / "other-eval.tsv", 50)
    record = run_recipe(recipe_text(tiny_encoder, sst2_small["train"], other_eval, steps, labels=labels),
                        tmp_path / "other-eval")
    assert [s["cached"] for s in record["steps"]] == [True, True] and record["artifacts"][1]["rows"] == 50
    other_train = write_tsv_slice(sst2_small["train"], tmp_path / "other-train.tsv", 500)
    record = run_recipe(recipe_text(tiny_encoder, other_train, sst2_small["eval"], steps, labels=labels),
                        tmp_path / "other-train")
    assert record["steps"][0]["cached"] is False
    held = recipe_text(tiny_encoder, sst2_small["train"], sst2_small["eval"], steps, labels=labels,
                       data_extra="  holdout: 120\n")
    record = run_recipe(held, tmp_path / "held")
    assert record["steps"][0]["cached"] is False and record["steps"][0]["output_hash"] != first["steps"][0]["output_hash"]
    record = run_recipe(held.replace("evaluate: {", "evaluate: {split: tune, "), tmp_path / "tune")
    assert [s["cached"] for s in record["steps"]] == [True, True]
    assert record["artifacts"][1]["rows"] == 120 and record["evaluation"] is not None
