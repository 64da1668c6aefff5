"""prune on tiny Llama-family decoders: layers dropped by block influence or by index (the KV cache and the
config renumbered, the result reloads and generates), the MLP narrowed to its strongest channels, and the
settings a decoder cannot take refused at check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

IDENTITY = 2  # the layer of `llama4["identity"]` whose output equals its input


def recipe(model: Path, train: Path | None, with_: str) -> str:
    """One prune step on a text-generation model; SST-2 rows as prompts and completions."""
    data = ""
    if train is not None:
        data = (f"data:\n  format: tsv\n  train: {train}\n  text: sentence\n  label: label\n"
                f"  prompt: \"Review: {{text}}\\nSentiment:\"\n  completions: {{'0': negative, '1': positive}}\n")
    return (f"version: 1\nname: llm-prune\nmodel: {{path: {model}, task: text-generation}}\n{data}"
            f"steps:\n  - uses: prune\n    with: {with_}\nevaluate: {{latency: null}}\n")


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, sst2_small) -> dict[str, Path]:
    """A tiny Llama with 4 layers, and a copy whose layer IDENTITY adds nothing (o_proj and down_proj zero)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compressor.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("llama4")
    texts = [line.split("\t")[0] for line in sst2_small["train"].read_text(encoding="utf-8").splitlines()[1:]]
    # hidden 32, MLP 64 wide: nothing here is exported, so the heads need not be 16 wide
    plain = build_tiny_llama(root / "plain", texts, num_hidden_layers=4, hidden_size=32, intermediate_size=64)
    identity = root / "identity"
    shutil.copytree(plain, identity)
    model = AutoModelForCausalLM.from_pretrained(plain)
    with torch.no_grad():
        model.model.layers[IDENTITY].self_attn.o_proj.weight.zero_()
        model.model.layers[IDENTITY].mlp.down_proj.weight.zero_()
    model.save_pretrained(str(identity), safe_serialization=True)
    return {"plain": plain, "identity": identity}


def _run(tmp_path: Path, model: Path, train: Path, with_: str) -> dict:
    from compressor.testing import run_recipe

    return run_recipe(recipe(model, train, with_), tmp_path)


def _prompt(model_dir: Path):
    """A short chat prompt as a batch of one (input_ids, attention_mask)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer(["Review: a gripping, funny and moving film\nSentiment: positive. Review: dull"],
                     return_tensors="pt")


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _greedy(model, batch, use_cache: bool) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=use_cache,
                             pad_token_id=model.config.pad_token_id)
    return out[0].tolist()


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_block_influence_drops_the_layer_that_changes_nothing(tmp_path, compressor_cache, llama4, sst2_small):
    import torch
    from compressor.plugins.prune.decoder import drop_layers

    record = _run(tmp_path, llama4["identity"], sst2_small["train"], "{keep: 3, calibration_rows: 16}")
    step = record["steps"][0]
    notes = step["notes"]
    assert step["config"]["layer_choice"] == "block-influence"  # the decoder default, filled in at check
    assert notes["kept_layers"] == [0, 1, 3] and notes["layers"] == 3 and notes["calibration_rows"] == 16
    influence = notes["block_influence"]
    assert len(influence) == 4 and abs(influence[IDENTITY]) < 1e-9
    assert min(influence[i] for i in (0, 1, 3)) > 1e-3
    reloaded = _load(Path(step["path"]))
    assert reloaded.config.num_hidden_layers == 3 and len(reloaded.model.layers) == 3
    in_memory = _load(llama4["identity"])
    full = _logits(in_memory, _prompt(llama4["identity"]))
    drop_layers(in_memory, [0, 1, 3])
    assert [layer.self_attn.layer_idx for layer in in_memory.model.layers] == [0, 1, 2]
    batch = _prompt(Path(step["path"]))
    assert torch.equal(_logits(reloaded, batch), _logits(in_memory, batch))
    assert torch.allclose(_logits(reloaded, batch), full, atol=1e-6)  # the dropped layer added nothing
    for model in (reloaded, in_memory):
        cached = _greedy(model, batch, use_cache=True)
        assert len(cached) == batch["input_ids"].shape[1] + 12 and cached == _greedy(model, batch, use_cache=False)


@pytest.mark.parametrize("with_,kept", [("{keep_layers: [2, 0]}", [0, 2]), ("{keep: 2, layer_choice: even}", [0, 3])])
def test_layers_kept_by_index_match_a_manual_cut(tmp_path, compressor_cache, llama4, sst2_small, with_, kept):
    import torch

    record = _run(tmp_path, llama4["plain"], sst2_small["train"], with_)
    notes = record["steps"][0]["notes"]
    assert notes["kept_layers"] == kept and "block_influence" not in notes
    reference = _load(llama4["plain"])
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in kept])
    reference.config.num_hidden_layers = len(kept)
    out = Path(record["steps"][0]["path"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    batch = _prompt(out)
    assert torch.allclose(_logits(_load(out), batch), _logits(reference, batch), atol=1e-6)


def test_ffn_ratio_keeps_the_strongest_mlp_channels(tmp_path, compressor_cache, llama4, sst2_small):
    import torch

    record = _run(tmp_path, llama4["plain"], sst2_small["train"], "{ffn_ratio: 0.5}")
    notes = record["steps"][0]["notes"]
    out = Path(record["steps"][0]["path"])
    assert notes["intermediate_size"] == 32 and notes["layers"] == 4 and "kept_layers" not in notes
    assert notes["params_after"] < notes["params_before"] and notes["macs_after"] < notes["macs_before"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 32
    before, after = load_file(str(llama4["plain"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    reference = _load(llama4["plain"])
    for i, layer in enumerate(reference.model.layers):
        name = f"model.layers.{i}.mlp"
        gate0, up0, down0 = (before[f"{name}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        gate, up, down = (after[f"{name}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        assert gate.shape == up.shape == (32, 32) and down.shape == (32, 32)
        kept = [int(np.flatnonzero((gate0 == row).all(1))[0]) for row in gate]
        strength = (gate0 ** 2).sum(1) + (up0 ** 2).sum(1) + (down0 ** 2).sum(0)
        assert kept == sorted(kept) and set(kept) == set(np.argsort(strength)[-32:].tolist())
        assert strength[kept].min() >= np.delete(strength, kept).max()
        assert np.array_equal(up, up0[kept]) and np.array_equal(down, down0[:, kept])
        with torch.no_grad():  # the reference: the same channels cut by hand
            for linear, rows in ((layer.mlp.gate_proj, True), (layer.mlp.up_proj, True), (layer.mlp.down_proj, False)):
                linear.weight = torch.nn.Parameter(linear.weight[kept] if rows else linear.weight[:, kept])
    pruned = _load(out)
    assert pruned.model.layers[0].mlp.gate_proj.out_features == 32
    batch = _prompt(out)
    assert torch.allclose(_logits(pruned, batch), _logits(reference, batch), atol=1e-6)
    assert _greedy(pruned, batch, use_cache=True) == _greedy(pruned, batch, use_cache=False)


def test_taylor_scores_narrow_the_mlp_of_a_decoder(tmp_path, compressor_cache, llama4, sst2_small):
    record = _run(tmp_path, llama4["plain"], sst2_small["train"],
                  "{ffn_ratio: 0.25, importance: taylor, taylor_batches: 1, batch_size: 8}")
    notes = record["steps"][0]["notes"]
    assert notes["importance"] == "taylor" and notes["intermediate_size"] == 48
    assert _load(Path(record["steps"][0]["path"])).model.layers[3].mlp.down_proj.in_features == 48


def test_qwen2_layer_types_follow_the_kept_layers(tmp_path):
    import torch
    from compressor.plugins.prune.decoder import drop_layers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    drop_layers(model, [1, 3])
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = Qwen2ForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    batch = {"input_ids": torch.arange(3, 13)[None], "attention_mask": torch.ones(1, 10, dtype=torch.long)}
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))
    assert _greedy(model, batch, use_cache=True) == _greedy(model, batch, use_cache=False)


def test_supports_names_the_models_and_task_it_takes():
    from compressor.plugins.prune import Prune, PruneConfig

    from compressor.tasks import task_for

    config, step = PruneConfig(keep=1), Prune()
    generation, classification = task_for("text-generation"), task_for("text-classification")
    assert step.supports(config, generation, {"model_type": "qwen2"}) is None
    assert step.supports(config, classification, {"model_type": "bert"}) is None
    assert "not as text-classification models" in step.supports(config, classification, {"model_type": "llama"})
    reason = step.supports(config, generation, {"model_type": "gpt2"})
    assert "'gpt2'" in reason and "BERT-style" in reason and "llama, mistral, qwen2" in reason


@pytest.mark.parametrize("with_,train,words", [
    ("{keep_layers: [0, 4]}", True, ["steps[0] (prune).with.keep_layers",
                                     "layer index 4 is out of range: the model has 4 layers (0..3)"]),
    ("{head_ratio: 0.5}", True, ["steps[0] (prune).with.head_ratio",
                                 "does not remove attention heads of decoder LLMs (GQA groups)"]),
    ("{target: [ffn, heads], ratio: 0.5}", True, ["steps[0] (prune).with.target", "attention heads"]),
    ("{ffn_ratio: 0.995}", True, ["would remove all 64 MLP channels"]),
    ("{keep: 2}", False, ["steps[0] (prune).with.layer_choice", "block influence needs calibration text",
                          "layer_choice: even"]),
    ("{keep: 2, layer_choice: block-influence}", False, ["steps[0] (prune)", "needs train data"]),
    ("{keep_layers: [0], layer_choice: even}", True, ["keep_layers names them itself"]),
])
def test_decoder_settings_prune_cannot_take_are_refused_at_check(tmp_path, cli_run, llama4, sst2_small, with_,
                                                                 train, words):
    path = tmp_path / "r.yaml"
    path.write_text(recipe(llama4["plain"], sst2_small["train"] if train else None, with_))
    code, _, err = cli_run("check", str(path))
    assert code == 2 and all(w in err for w in words), err
