"""Every model family compressor claims, each proved on a tiny config built here (no download).

Decoders (Llama, Mistral, Qwen2, Qwen3, Phi-3): LoRA fine-tune → merge → layer drop → export with
onnxruntime-genai's builder → int4 → a generation bundle that verifies, and that onnxruntime-genai's own
runtime (`og.Model(bundle)`) runs to the same greedy tokens. Encoders (BERT, RoBERTa, DistilBERT, XLM-R):
export with torch.onnx → fused attention → int8. Families the builder or the fusions do not handle are
refused at `check` with exit 2, naming what is supported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from compressor.testing import build_tiny_llama, run_recipe, tiny_llama_texts

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3")
ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta")
needs_genai = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                                 reason="needs onnxruntime-genai (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def decoder_texts() -> list[str]:
    """What the tiny decoders' tokenizer is trained on."""
    return tiny_llama_texts()


def decoder_recipe(model: Path, data: dict[str, Path], corpus: Path) -> str:
    """SST-2 as an instruction task: LoRA (merged), keep layers 0 and 2 of 3, builder export, int4, bundle."""
    return (f"version: 1\nname: family\nmodel: {{path: {model}, task: text-generation}}\n"
            f"data:\n  format: tsv\n  train: {data['train']}\n  eval: {data['eval']}\n  text: sentence\n"
            f"  label: label\n  prompt: \"Review: {{text}}\\nSentiment:\"\n"
            f"  completions: {{'0': negative, '1': positive}}\n"
            "steps:\n"
            "  - uses: finetune\n    with: {method: lora, merge: true, epochs: 1, max_train_rows: 96, batch_size: 16, "
            "max_length: 64, learning_rate: 5.0e-3}\n"
            "  - uses: prune\n    with: {keep_layers: [0, 2]}\n"
            "  - uses: export-onnx\n    with: {atol: 1.0e-3, parity_rows: 4}\n"
            "  - uses: quantize-onnx\n    with: {mode: int4, block_size: 16, op_types: [MatMul]}\n"
            f"evaluate:\n  latency: null\n  task: {{perplexity_file: {corpus}, perplexity_tokens: 256, window: 128, "
            "accuracy_rows: 8, "
            "prompt_tokens: 16, new_tokens: 8, timing_runs: 1}\n"
            "bundle: {formats: [onnx]}\n")


@needs_genai
# the inner loop (-m "not slow") runs the first family of each kind; the full suite runs them all
@pytest.mark.parametrize("family", [DECODERS[0], *(pytest.param(f, marks=pytest.mark.slow) for f in DECODERS[1:])])
def test_a_decoder_family_goes_from_lora_to_an_int4_bundle(family, tmp_path, decoder_texts, sst2_small, cli_run):
    import numpy as np
    import onnxruntime_genai as og

    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.testing import require_data

    corpus = require_data("wikitext-2/test.txt") / "wikitext-2" / "test.txt"
    model = build_tiny_llama(tmp_path / family, decoder_texts, family=family, num_hidden_layers=3)
    record = run_recipe(decoder_recipe(model, sst2_small, corpus), tmp_path, cache=tmp_path / "cache")
    arts = {a["name"]: a for a in record["artifacts"]}
    notes = {s["uses"]: s["notes"] for s in record["steps"]}
    assert notes["finetune"]["method"] == "lora"
    assert notes["prune"]["kept_layers"] == [0, 2] and notes["prune"]["layers"] == 2
    assert notes["export-onnx"]["parity_greedy_identical"] == "4/4"
    assert arts["export-onnx"]["perplexity"] == pytest.approx(arts["prune"]["perplexity"], rel=1e-3)
    assert arts["quantize-onnx"]["perplexity"] < 1.5 * arts["export-onnx"]["perplexity"]
    assert arts["quantize-onnx"]["size_bytes"] < arts["export-onnx"]["size_bytes"]
    bundle = tmp_path / "run" / "bundle"
    code, _, err = cli_run("verify", str(bundle))
    assert code == 0, err
    # onnxruntime-genai's own runtime reads the bundle as it is and gives our greedy tokens
    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2
    predictor = bundle_runtime.Predictor(bundle)
    ids = predictor.answers.prompt_ids("Review: a gripping film\nSentiment:")
    ours = list(predictor.answers.lm.stream(ids, 8, set()))  # 8 greedy tokens, no stop token
    og_model = og.Model(str(bundle))
    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 8, batch_size=1)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    theirs = []
    while not generator.is_done() and len(theirs) < 8:
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs and theirs == ours[: len(theirs)]  # onnxruntime-genai stops early at an end-of-turn token


def tiny_encoder_family(out_dir: Path, family: str, base: Path) -> Path:
    """A tiny encoder classifier of `family` (2 layers, hidden 32, 2 heads) with the WordPiece tokenizer of
    `base`; RoBERTa, XLM-R and DistilBERT tokenizers give no token_type_ids, so this one gives none either."""
    import torch
    import transformers

    shutil.copytree(base, out_dir)
    for name in ("config.json", "model.safetensors"):
        (out_dir / name).unlink()
    vocab = len((base / "vocab.txt").read_text(encoding="utf-8").splitlines())
    common = dict(vocab_size=vocab, num_labels=2, id2label={0: "negative", 1: "positive"},
                  label2id={"negative": 0, "positive": 1})
    bert = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=130)
    config = {"bert": transformers.BertConfig(**common, **bert),
              "roberta": transformers.RobertaConfig(**common, **bert, pad_token_id=0, type_vocab_size=1),
              "xlm-roberta": transformers.XLMRobertaConfig(**common, **bert, pad_token_id=0, type_vocab_size=1),
              "distilbert": transformers.DistilBertConfig(**common, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                          max_position_embeddings=130, pad_token_id=0)}[family]
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(str(out_dir))
    if family != "bert":
        settings = json.loads((out_dir / "tokenizer_config.json").read_text())
        settings["model_input_names"] = ["input_ids", "attention_mask"]
        (out_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    return out_dir


@pytest.mark.parametrize("family", [ENCODERS[0], *(pytest.param(f, marks=pytest.mark.slow) for f in ENCODERS[1:])])
def test_an_encoder_family_exports_fuses_and_quantizes(family, tmp_path, tiny_text_model, sst2_small):
    import onnx

    model = tiny_encoder_family(tmp_path / family, family, tiny_text_model)
    steps = ("  - uses: export-onnx\n  - uses: optimize-onnx\n"
             "  - uses: quantize-onnx\n    with: {mode: dynamic, per_channel: true}\n")
    text = (f"version: 1\nname: family\nmodel: {{path: {model}, task: text-classification}}\n"
            f"data: {{format: tsv, eval: {sst2_small['eval']}, text: sentence, label: label}}\n"
            f"steps:\n{steps}evaluate: {{latency: {{runs: 3, warmup: 1, batch_sizes: [1]}}}}\n")
    record = run_recipe(text, tmp_path, cache=tmp_path / "cache")
    arts = {a["name"]: a for a in record["artifacts"]}
    notes = {s["uses"]: s["notes"] for s in record["steps"]}
    exported = onnx.load(str(Path(arts["export-onnx"]["path"]) / "model.onnx"))
    inputs = [i.name for i in exported.graph.input]
    assert inputs == (["input_ids", "attention_mask", "token_type_ids"] if family == "bert"
                      else ["input_ids", "attention_mask"])
    assert [o.name for o in exported.graph.output] == ["logits"]
    assert notes["export-onnx"]["parity_max_abs_diff"] < 1e-4
    assert notes["optimize-onnx"]["fused"]["Attention"] == 2  # one per layer
    assert notes["optimize-onnx"]["parity_max_abs_diff"] < 1e-3
    ops = {n.op_type for n in onnx.load(str(Path(arts["quantize-onnx"]["path"]) / "model.onnx")).graph.node}
    assert "QAttention" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert abs(arts["quantize-onnx"]["accuracy"] - arts["export-onnx"]["accuracy"]) <= 0.05


@pytest.mark.parametrize("family, step, message", [
    ("gemma2", "  - uses: export-onnx\n", "the Gemma2ForCausalLM family is not one compressor exports"),
    ("modernbert", "  - uses: export-onnx\n  - uses: optimize-onnx\n",
     "cannot tell which fusions fit model_type 'modernbert'"),
])
def test_an_unsupported_family_is_refused_at_check(family, step, message, tmp_path, cli_run, decoder_texts,
                                                   tiny_text_model, sst2_small):
    if family == "gemma2":
        model, task = build_tiny_llama(tmp_path / family, decoder_texts, family=family), "text-generation"
    else:
        model, task = tmp_path / family, "text-classification"
        shutil.copytree(tiny_text_model, model)
        config = json.loads((model / "config.json").read_text())
        config.update(model_type="modernbert", architectures=["ModernBertForSequenceClassification"])
        (model / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nname: family\nmodel: {{path: {model}, task: {task}}}\n"
                      f"data: {{format: tsv, eval: {sst2_small['eval']}, text: sentence, label: label}}\n"
                      f"steps:\n{step}")
    code, out, err = cli_run("check", str(recipe))
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
