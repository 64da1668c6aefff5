"""The bad-input corpus: models, tokenizers, data, step settings, plugins and the run's environment
gone wrong. Each case builds its bad input in a temporary directory and states exactly what must
happen: the exit code, the words of the one message (including where it points), no traceback,
the input model's files unchanged, and no half-written artifact left in the cache or run directory.

(The recipe-syntax cases — YAML, types, unknown keys, `--set` — live in test_recipe_errors.py.)
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import recipe_text

EXPORT = "  - uses: export-onnx\n"


@dataclass
class World:
    """What a case may break: a private copy of the tiny model, data slices, and the tmp dir."""

    tmp: Path
    model: Path
    train: Path
    eval: Path
    steps: str = EXPORT
    extra: str = ""
    args: list[str] = field(default_factory=list)
    command: str = "check"

    def recipe(self) -> Path:
        path = self.tmp / "recipe.yaml"
        if not path.exists():
            path.write_text(recipe_text(self.model, self.train, self.eval, self.steps, self.extra), encoding="utf-8")
        return path

    def tsv(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path


@dataclass
class Case:
    id: str
    setup: Callable[[World], None]
    code: int
    words: list[str]


def _steps(text: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        w.steps = text
    return setup


def _run_steps(text: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        w.steps, w.command = text, "run"
    return setup


# -- the model directory ---------------------------------------------------------------------------
def _empty_model(w: World) -> None:
    for f in w.model.iterdir():
        f.unlink()


def _config_not_json(w: World) -> None:
    (w.model / "config.json").write_text("{not json", encoding="utf-8")


def _truncated_weights(w: World) -> None:
    data = (w.model / "model.safetensors").read_bytes()
    (w.model / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_weights(w: World) -> None:
    (w.model / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)


def _bad_header_weights(w: World) -> None:
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # cut JSON
    (w.model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)


def _no_tokenizer(w: World) -> None:
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (w.model / name).unlink(missing_ok=True)


def _model_is_a_file(w: World) -> None:
    shutil.rmtree(w.model)
    w.model.write_text("not a model")


def _unsupported_architecture(w: World) -> None:
    config = json.loads((w.model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2ForSequenceClassification"])
    (w.model / "config.json").write_text(json.dumps(config))
    w.steps = "  - uses: prune\n    with: {ratio: 0.5}\n"


# -- data ------------------------------------------------------------------------------------------
def _finetune_on(name: str, content: str | bytes) -> Callable[[World], None]:
    """A finetune step reading this train file."""
    def setup(w: World) -> None:
        w.train, w.steps = w.tsv(name, content), "  - uses: finetune\n"
    return setup


_empty_data = _finetune_on("empty.tsv", "")
_header_only = _finetune_on("header.tsv", "sentence\tlabel\n")
_no_label_column = _finetune_on("nolabel.tsv", "sentence\tscore\na fine film\t1\n")
_non_utf8_train = _finetune_on("latin1.tsv", "sentence\tlabel\n".encode() + "caf\xe9 cr\xe8me\t1\n".encode("latin-1"))


def _unknown_labels(w: World) -> None:
    w.eval = w.tsv("labels.tsv", "sentence\tlabel\na fine film\t1\nawful\t7\n")


_single_row = _finetune_on("one.tsv", "sentence\tlabel\na fine film\t1\n")
_ragged_row = _finetune_on("ragged.tsv", "sentence\tlabel\na fine film\t1\nbroken row without a label\n")


def _broken_jsonl(w: World) -> None:
    w.train = w.tsv("train.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": \n')
    w.eval = w.tsv("dev.jsonl", '{"sentence": "good", "label": 1}\n')
    text = recipe_text(w.model, w.train, w.eval, "  - uses: finetune\n", data_format="jsonl")
    (w.tmp / "recipe.yaml").write_text(text.replace("format: jsonl", "format: jsonl\n  text: sentence"))


def _conll_wrong_columns(w: World) -> None:
    w.train = w.tsv("train.txt", "EU NNP B-NP B-ORG\nrejects\n\n")
    text = recipe_text(w.model, w.train, None, "  - uses: finetune\n", task="token-classification",
                       data_format="conll")
    (w.tmp / "recipe.yaml").write_text(text)


def _data_is_a_directory(w: World) -> None:
    w.train = w.tmp / "adir"
    w.train.mkdir()
    w.steps = "  - uses: finetune\n"


# -- teachers, adapters and absurd settings -------------------------------------------------------
def _teacher_other_labels(w: World) -> None:
    teacher = w.tmp / "teacher"
    shutil.copytree(w.model, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "bad", "1": "good"}, {"bad": 0, "good": 1}
    (teacher / "config.json").write_text(json.dumps(config))
    w.steps = f"  - uses: distill\n    with: {{teacher: {teacher}}}\n"


def _adapter_other_base(w: World) -> None:
    adapter = w.tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "gpt2", "target_modules": ["c_attn"], "r": 4,
         "lora_alpha": 8, "task_type": "SEQ_CLS"}))
    import numpy as np
    from safetensors.numpy import save_file

    # LoRA factors of GPT-2 (width 768); the tiny BERT is 32 wide
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((4, 768), np.float32),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": np.zeros((2304, 4), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    w.steps = f"  - uses: merge-adapter\n    with: {{adapters: [{{path: {adapter}}}]}}\n"


def _adapter_file_empty(w: World) -> None:
    _adapter_other_base(w)
    (w.tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"")


CASES = [
    # the model directory
    Case("model dir empty", _empty_model, 2, ["has no config.json", "model.path"]),
    Case("config not json", _config_not_json, 2, ["config.json is not valid JSON", "model.path"]),
    Case("truncated safetensors", _truncated_weights, 2, ["model.safetensors", "truncated", "model.path"]),
    Case("garbage safetensors", _garbage_weights, 2, ["model.safetensors", "not a valid safetensors file"]),
    Case("safetensors header cut", _bad_header_weights, 2, ["model.safetensors", "not a valid safetensors file"]),
    Case("no tokenizer", _no_tokenizer, 2, ["has no tokenizer", "model.path"]),
    Case("model path is a file", _model_is_a_file, 2, ["is not a directory", "model.path"]),
    Case("architecture prune cannot handle", _unsupported_architecture, 2,
         ["steps[0] (prune)", "gpt2", "BERT-style"]),
    # data
    Case("empty data file", _empty_data, 2, ["data.train", "is empty"]),
    Case("header only", _header_only, 2, ["data.train", "holds no rows"]),
    Case("missing label column", _no_label_column, 2, ["data.label", "column 'label'"]),
    Case("non-utf8 data", _non_utf8_train, 2, ["data.train", "UTF-8"]),
    Case("labels the model does not know", _unknown_labels, 2, ["data.eval", "labels the model does not have: 7"]),
    Case("ragged tsv row", _ragged_row, 2, ["data.train", "line 3", "has 1 column(s), the header has 2"]),
    Case("broken jsonl line", _broken_jsonl, 2, ["data.train", "line 2", "JSON"]),
    Case("conll line without a tag", _conll_wrong_columns, 2, ["data.train", "line 2", "no tag column"]),
    Case("data path is a directory", _data_is_a_directory, 2, ["data.train", "not a file"]),
    # teachers and adapters
    Case("teacher with other labels", _teacher_other_labels, 2,
         ["steps[0] (distill).with.teacher", "differ from the student's"]),
    Case("adapter for another base", _adapter_other_base, 2,
         ["steps[0] (merge-adapter).with.adapters[0].path", "trained on another base", "768"]),
    Case("adapter weights empty", _adapter_file_empty, 2,
         ["steps[0] (merge-adapter).with.adapters[0].path", "not a valid safetensors file"]),
    # absurd or impossible settings
    Case("batch size 1e9", _steps("  - uses: finetune\n    with: {batch_size: 1000000000}\n"), 2,
         ["steps[0] (finetune).with.batch_size", "less than or equal"]),
    Case("prune ratio 1.0", _steps("  - uses: prune\n    with: {ratio: 1.0}\n"), 2,
         ["steps[0] (prune).with.ratio", "less than 1"]),
    Case("prune ratio negative", _steps("  - uses: prune\n    with: {ratio: -0.1}\n"), 2,
         ["steps[0] (prune).with.ratio"]),
    Case("keep_layers out of range", _steps("  - uses: prune\n    with: {keep_layers: [0, 9]}\n"), 2,
         ["steps[0] (prune).with.keep_layers", "out of range"]),
    Case("keep more layers than exist", _steps("  - uses: prune\n    with: {keep: 12}\n"), 2,
         ["steps[0] (prune).with.keep", "more than the model's 2 layers"]),
    Case("nothing to prune", _steps("  - uses: prune\n"), 2, ["steps[0] (prune)", "nothing to prune"]),
    Case("int4 block size not dividing", _steps(EXPORT + "  - uses: quantize-onnx\n    with: {mode: int4, block_size: 48}\n"),
         2, ["steps[1] (quantize-onnx)", "block_size"]),
    Case("static without calibration data", lambda w: (_steps(EXPORT + "  - uses: quantize-onnx\n    with: {mode: static}\n")(w),
                                                        setattr(w, "train", None), setattr(w, "eval", None)),
         2, ["steps[1] (quantize-onnx)", "needs train data"]),
    Case("learning rate negative", _steps("  - uses: finetune\n    with: {learning_rate: -1}\n"), 2,
         ["steps[0] (finetune).with.learning_rate"]),
    Case("max_length zero", _steps("  - uses: finetune\n    with: {max_length: 0}\n"), 2,
         ["steps[0] (finetune).with.max_length"]),
    Case("temperature zero", _steps("  - uses: distill\n    with: {temperature: 0}\n"), 2,
         ["steps[0] (distill).with.temperature"]),
    Case("optimize-onnx on a model it has no fusions for", lambda w: (_unsupported_architecture(w),
                                                                      _steps(EXPORT + "  - uses: optimize-onnx\n")(w)),
         2, ["steps[1] (optimize-onnx).with.model_type", "'gpt2'", "set model_type"]),
    Case("optimize-onnx model type unknown", _steps(EXPORT + "  - uses: optimize-onnx\n    with: {model_type: bret}\n"),
         2, ["steps[1] (optimize-onnx).with.model_type", "unknown model_type 'bret'", "bert"]),
    Case("optimize-onnx after quantization", _steps(EXPORT + "  - uses: quantize-onnx\n  - uses: optimize-onnx\n"),
         2, ["steps[2] (optimize-onnx)", "comes after steps[1] (quantize-onnx)", "right after export-onnx"]),
    Case("optimize-onnx twice", _steps(EXPORT + "  - uses: optimize-onnx\n  - uses: optimize-onnx\n"),
         2, ["steps[2] (optimize-onnx)", "steps[1] (optimize-onnx) already fused"]),
    Case("static quantization after optimize-onnx",
         _steps(EXPORT + "  - uses: optimize-onnx\n  - uses: quantize-onnx\n    with: {mode: static}\n"),
         2, ["steps[2] (quantize-onnx).with.mode", "cannot follow steps[1] (optimize-onnx)", "mode: dynamic"]),
    Case("export-tensorrt after onnxruntime-only operators",
         _steps(EXPORT + "  - uses: quantize-onnx\n  - uses: export-tensorrt\n"),
         2, ["steps[2] (export-tensorrt)", "steps[1] (quantize-onnx mode: dynamic)", "TensorRT cannot parse"]),
    Case("trim-vocab after export", _steps(EXPORT + "  - uses: trim-vocab\n"), 2,
         ["steps[1] (trim-vocab)", "needs a hf model"]),
    Case("bundle from hf", lambda w: (_steps("  - uses: prune\n    with: {ratio: 0.25}\n")(w),
                                      setattr(w, "extra", "bundle: {formats: [ort]}\n")), 2,
         ["bundle.formats", "needs an onnx or ort model", "export-onnx"]),
]


@pytest.fixture
def world(tmp_path: Path, tiny_text_model: Path, sst2_small: dict[str, Path]) -> World:
    model = tmp_path / "model"
    shutil.copytree(tiny_text_model, model)
    return World(tmp=tmp_path, model=model, train=sst2_small["train"], eval=sst2_small["eval"])


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes (a model directory is small in these tests)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_clean_failure(code: int, err: str, expected_code: int, words: list[str]) -> None:
    """One message, the right exit code, every expected word, no traceback."""
    assert code == expected_code, (code, err)
    assert "Traceback" not in err and 'File "' not in err, err
    for word in words:
        assert word in err, (word, err)


def assert_nothing_half_written(cache: Path, run_dir: Path | None = None) -> None:
    leftovers = [p for p in cache.rglob("*") if ".tmp" in p.name] if cache.exists() else []
    assert not leftovers, leftovers
    if run_dir is not None and run_dir.exists():
        assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, cli_run, compressor_cache):
    case.setup(world)
    before = snapshot(world.model) if world.model.exists() else {}
    run_dir = world.tmp / "run"
    args = [world.command, str(world.recipe())] + (["--out", str(run_dir)] if world.command == "run" else [])
    code, _, err = cli_run(*args)
    assert_clean_failure(code, err, case.code, case.words)
    if world.model.exists():
        assert snapshot(world.model) == before
    assert_nothing_half_written(compressor_cache, run_dir)


def test_a_single_training_row_is_allowed_with_a_warning(world: World, cli_run):
    _single_row(world)
    code, out, err = cli_run("check", str(world.recipe()))
    assert code == 0, err
    assert "data.train has only 1 row" in out + err


def test_a_run_directory_that_cannot_be_written(world: World, cli_run, compressor_cache):
    blocker = world.tmp / "a-file"
    blocker.write_text("x")
    code, _, err = cli_run("run", str(world.recipe()), "--out", str(blocker / "run"))
    assert_clean_failure(code, err, 2, ["--out", "cannot write to the run directory", str(blocker / "run"),
                                        "Not a directory", "choose a writable directory"])
    code, _, err = cli_run("run", str(world.recipe()), "--out", str(blocker))
    assert_clean_failure(code, err, 2, ["--out", str(blocker), "choose a writable directory"])
    assert blocker.read_text() == "x"


def test_a_step_that_raises_mid_run(world: World, cli_run, compressor_cache, monkeypatch):
    """A step failing after earlier steps finished: exit 4, the step named, the record kept, the
    finished steps cached, nothing half-written."""
    from compressor.plugins import prune

    def explode(*args, **kwargs):
        raise RuntimeError("CUDA kernel exploded")

    monkeypatch.setattr(prune, "_prune_ffn", explode)
    world.steps = EXPORT.replace("export-onnx", "finetune\n    with: {max_train_rows: 64}") + \
        "  - uses: prune\n    with: {ratio: 0.5}\n"
    before = snapshot(world.model)
    run_dir = world.tmp / "run"
    code, _, err = cli_run("run", str(world.recipe()), "--out", str(run_dir))
    assert_clean_failure(code, err, 4, ["steps[1] (prune)", "RuntimeError", "CUDA kernel exploded"])
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "failed" and record["steps"][0]["uses"] == "finetune"
    assert snapshot(world.model) == before
    assert_nothing_half_written(compressor_cache, run_dir)


def test_a_full_disk(world: World, cli_run, monkeypatch):
    """ENOSPC while a step saves: exit 4 with what happened and what to do, nothing half-written. The disk
    really fills: the cache lives on a 600 kB tmpfs (skipped where this machine cannot mount one)."""
    import subprocess

    mount = world.tmp / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(mount / "cache"))
        world.steps = "  - uses: prune\n    with: {ratio: 0.25}\n  - uses: prune\n    with: {ratio: 0.25}\n" \
                      "  - uses: export-onnx\n"
        code, _, err = cli_run("run", str(world.recipe()), "--out", str(world.tmp / "run"))
        assert_clean_failure(code, err, 4, ["No space left on device", "free"])
        assert_nothing_half_written(mount / "cache", world.tmp / "run")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_plugin_problems_exit_3_naming_the_plugin(tmp_path, tiny_text_model, sst2_small):
    """A plugin that raises on import, or whose hook has a wrong signature: exit 3 when the recipe
    needs its step, with the plugin named; a duplicate step name is refused with both providers."""
    from conftest import NOOP_STEP, make_dist
    from conftest import site_cli as cli

    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "boomplug", "boomplug_mod", "raise ImportError('libfoo.so not found')\n")
    make_dist(site, "sigplug", "sigplug_mod", NOOP_STEP.format(step="sig", hook="register_steps").replace(
        "def register_steps(register)", "def register_steps(register, extra)"))
    make_dist(site, "dupplug", "dupplug_mod", NOOP_STEP.format(step="prune", hook="register_steps"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], "  - uses: boom\n"))
    done = cli(site, "check", str(recipe))
    assert done.returncode == 3 and "boomplug" in done.stderr and "libfoo.so" in done.stderr
    assert "Traceback" not in done.stderr
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], "  - uses: sig\n"))
    done = cli(site, "check", str(recipe))
    assert done.returncode == 3 and "sigplug" in done.stderr and "Traceback" not in done.stderr
    plugins = {p["name"]: p for p in json.loads(cli(site, "plugins", "--json").stdout)["plugins"]}
    assert "registered twice" in plugins["dupplug"]["error"] and "'prune'" in plugins["dupplug"]["error"]


def test_duplicate_keys_are_refused_with_their_line(tmp_path, cli_run, tiny_text_model, sst2_small):
    """YAML keeps the last of two equal keys without a word; a recipe refuses them."""
    text = recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], EXPORT)
    path = tmp_path / "r.yaml"
    path.write_text(text.replace("name: test\n", "name: test\nname: other\n"))
    code, _, err = cli_run("check", str(path))
    assert_clean_failure(code, err, 2, ["duplicate key 'name'", "r.yaml:3:"])
