"""Nothing unsafe is loaded: a malicious pickle where a model or adapter is expected is refused
without being unpickled; the teacher path and the evaluators read safetensors only."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from conftest import recipe_text


class Payload:
    """Unpickling this runs `open(marker, 'w')`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_pickled_model_is_refused_not_loaded(tmp_path, cli_run, tiny_text_model, sst2_small, command):
    marker = tmp_path / "PWNED"
    model = tmp_path / "model"
    shutil.copytree(tiny_text_model, model)
    (model / "model.safetensors").unlink()
    _evil(model / "pytorch_model.bin", marker)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(model, sst2_small["train"], sst2_small["eval"], "  - uses: export-onnx\n"))
    code, _, err = cli_run(command, str(recipe), *(["--out", str(tmp_path / "run")] if command == "run" else []))
    assert code == 2 and "pickled weights" in err and "safe_serialization=True" in err
    assert not marker.exists()


def test_a_pickle_beside_safetensors_is_ignored(tmp_path, cli_run, compressor_cache, tiny_text_model, sst2_small):
    """transformers would prefer safetensors anyway; compressor asks for them explicitly."""
    marker = tmp_path / "PWNED"
    model = tmp_path / "model"
    shutil.copytree(tiny_text_model, model)
    _evil(model / "pytorch_model.bin", marker)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(model, sst2_small["train"], sst2_small["eval"], "  - uses: export-onnx\n"))
    code, _, err = cli_run("run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert not marker.exists()


def test_a_pickled_adapter_is_refused(tmp_path, cli_run, tiny_text_model, sst2_small):
    marker = tmp_path / "PWNED"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    _evil(adapter / "adapter_model.bin", marker)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                  f"  - uses: merge-adapter\n    with: {{adapter: {adapter}}}\n"))
    code, _, err = cli_run("check", str(recipe))
    assert code == 2 and "pickled adapter weights" in err
    assert not marker.exists()


def test_run_names_the_plugins_it_loaded(tmp_path, cli_run, compressor_cache, tiny_text_model, sst2_small):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, None, None, "  - uses: export-onnx\n"))
    code, _, err = cli_run("run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 0, err
    line = next(l for l in err.splitlines() if l.startswith("plugins: "))
    assert "export-onnx (compressor 0.1.0)" in line and "tasks (compressor 0.1.0)" in line


def test_no_user_string_reaches_a_shell():
    """The only subprocesses compressor starts are argument lists, never a shell command line."""
    import re

    root = Path(__file__).resolve().parent.parent
    sources = [p for d in ("compressor", "plugins", "export") for p in (root / d).rglob("*.py")]
    offenders = [str(p) for p in sources if re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", p.read_text())]
    assert not offenders
