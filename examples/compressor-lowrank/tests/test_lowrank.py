"""The lowrank plugin on tiny BERTs and real SST-2 rows, through compressor's public test helpers
(`compressor.testing`: tiny models, data slices, run_recipe, register_plugin)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compressor_lowrank import plugin
from compressor_lowrank.factorize import factorize_linear, rank_for


def _host():
    """The host with lowrank loaded: from its entry point when installed, else registered inline."""
    from compressor.host import build_host
    from compressor.testing import register_plugin

    host = build_host()
    if "lowrank" not in host.steps:
        register_plugin(host, plugin, name="lowrank")
    return host


def _recipe(model: Path, data: dict[str, Path], steps: str) -> str:
    return (f"version: 1\nname: lowrank-test\nmodel: {{path: {model}, task: text-classification}}\n"
            f"data: {{format: tsv, train: {data['train']}, eval: {data['eval']}, text: sentence, label: label}}\n"
            f"steps:\n{steps}evaluate: {{each_step: true, latency: null}}\n")


def test_full_rank_factors_reproduce_the_layer_and_truncation_is_optimal():
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    x = torch.randn(5, 48)
    assert torch.allclose(factorize_linear(linear, 24)(x), linear(x), atol=1e-5)
    # rank 4: the error equals the norm of the dropped singular values (Eckart–Young)
    s = torch.linalg.svdvals(linear.weight.detach())
    pair = factorize_linear(linear, 4)
    approx = pair[1].weight @ pair[0].weight
    assert torch.isclose(torch.linalg.norm(approx - linear.weight), s[4:].norm(), rtol=1e-4)
    # energy picks the smallest rank holding that share of Σs²
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    r = rank_for(s, None, 0.9)
    assert share[r - 1] >= 0.9 and (r == 1 or share[r - 2] < 0.9)


def test_lowrank_between_prune_and_export(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    """prune → lowrank → export-onnx: smaller, reloadable through the plugin's loader, and the ONNX
    export passes compressor's parity check against the factorized PyTorch model."""
    import torch
    from compressor.models import load_model
    from compressor.testing import run_recipe

    steps = ("  - uses: prune\n    with: {target: ffn, ratio: 0.25}\n"
             "  - uses: lowrank\n    with: {rank: 6, min_features: 16}\n"
             "  - uses: export-onnx\n")
    record = run_recipe(_recipe(tiny_text_model, sst2_small, steps), tmp_path, host=_host())
    pruned, low, onnx = record["steps"]
    notes = low["notes"]
    assert notes["layers_factorized"] == 2 * 6 and notes["mean_rank"] == 6
    assert notes["params_after"] < notes["params_before"]
    config = json.loads((Path(low["path"]) / "config.json").read_text())
    assert config["compressor_lowrank"]["ranks"]["bert.encoder.layer.0.intermediate.dense"] == 6
    assert onnx["notes"]["parity_max_abs_diff"] < 1e-4
    sizes = {a["name"]: a["size_bytes"] for a in record["artifacts"]}
    assert sizes["lowrank"] < sizes["prune"]
    # the saved model reloads (through load_hf_model) to the same weights the step computed
    from compressor.models.artifact import Artifact

    model = load_model(Artifact.load(Path(low["path"])))
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, torch.nn.Sequential) and layer[0].out_features == 6


def test_energy_picks_each_layers_rank_from_its_spectrum(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    """With `energy`, each layer keeps the rank its own singular values call for; a layer where that
    rank would save nothing stays whole, and a step that shrinks nothing fails with a clear message."""
    import torch
    from safetensors.torch import load_file
    from compressor.errors import StepError
    from compressor.testing import run_recipe

    host = _host()
    steps = "  - uses: lowrank\n    with: {energy: 1.0, min_features: 16}\n"
    with pytest.raises(StepError, match="no Linear layer matched the targets and got smaller"):
        run_recipe(_recipe(tiny_text_model, sst2_small, steps), tmp_path / "a", host=host)
    steps = "  - uses: lowrank\n    with: {energy: 0.5, min_features: 16}\n"
    record = run_recipe(_recipe(tiny_text_model, sst2_small, steps), tmp_path / "b", host=host)
    ranks = json.loads((Path(record["steps"][0]["path"]) / "config.json").read_text())["compressor_lowrank"]["ranks"]
    original = load_file(str(tiny_text_model / "model.safetensors"))
    assert ranks
    for name, rank in ranks.items():
        assert rank == rank_for(torch.linalg.svdvals(original[name + ".weight"].double()), None, 0.5)


@pytest.mark.parametrize("with_, words", [("{rank: 4, energy: 0.9}", "exactly one of rank or energy"),
                                          ("{rank: 64}", "not below the model's hidden size"),
                                          ("{rank: 0}", "greater than or equal to 1")])
def test_bad_settings_are_caught_by_check(tmp_path, tiny_text_model, sst2_small, with_, words):
    """Recipe errors exit 2 from `compressor check`, with the location and no traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tiny_text_model, sst2_small, f"  - uses: lowrank\n    with: {with_}\n"))
    done = subprocess.run([sys.executable, "-m", "compressor", "check", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and "steps[0] (lowrank)" in done.stderr and "Traceback" not in done.stderr
