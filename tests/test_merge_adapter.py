"""merge-adapter: merged logits equal the PEFT model's; several adapters combine as PEFT does;
an adapter for another base is refused by `compressor check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import recipe_text


def make_adapter(base_dir: Path, out: Path, seed: int, with_head: bool = True) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so that merging changes the outputs.

    With `with_head` it is a SEQ_CLS adapter that also saves the classifier (modules_to_save);
    without, it adapts the encoder only (PEFT combines only such adapters).
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    config = LoraConfig(task_type=TaskType.SEQ_CLS if with_head else None, r=4, lora_alpha=8,
                        target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def _logits(model, tokenizer, texts):
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


TEXTS = ["a gripping , beautifully made film .", "the plot is thin and the jokes fall flat .", "fine ."]


def test_single_adapter_merge_matches_peft(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compressor.testing import run_recipe

    adapter = make_adapter(tiny_text_model, tmp_path / "lora", seed=1)
    record = run_recipe(recipe_text(tiny_text_model, None, sst2_small["eval"],
                                    f"  - uses: merge-adapter\n    with: {{adapter: {adapter}}}\n  - uses: export-onnx\n"),
                        tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_text_model)
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_text_model),
                                           str(adapter)).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(record["steps"][0]["path"]).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_text_model).eval()
    expected = _logits(peft_model, tok, TEXTS)
    assert torch.allclose(_logits(merged, tok, TEXTS), expected, atol=1e-5)
    assert (_logits(base, tok, TEXTS) - expected).abs().max() > 1e-4  # the adapter did change the outputs
    assert record["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4


def test_two_adapters_linear_matches_peft(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compressor.testing import run_recipe

    a = make_adapter(tiny_text_model, tmp_path / "a", 1, with_head=False)
    b = make_adapter(tiny_text_model, tmp_path / "b", 2, with_head=False)
    steps = (f"  - uses: merge-adapter\n    with: {{adapters: [{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}],"
             " combination: linear}\n")
    record = run_recipe(recipe_text(tiny_text_model, None, sst2_small["eval"], steps), tmp_path)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_text_model), str(a),
                                      adapter_name="a0")
    model.load_adapter(str(b), adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], [0.7, 0.3], adapter_name="m", combination_type="linear")
    model.set_adapter("m")
    tok = AutoTokenizer.from_pretrained(tiny_text_model)
    merged = AutoModelForSequenceClassification.from_pretrained(record["steps"][0]["path"]).eval()
    assert torch.allclose(_logits(merged, tok, TEXTS), _logits(model.eval(), tok, TEXTS), atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path, cli_run, tiny_text_model, sst2_small):
    from compressor.testing import build_tiny_model, sst2_words

    other = build_tiny_model(tmp_path / "wide", "text-classification", ["negative", "positive"], sst2_words(5000),
                             hidden_size=48, num_attention_heads=4, intermediate_size=96)
    adapter = make_adapter(other, tmp_path / "wide-lora", seed=3)
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"],
                                f"  - uses: merge-adapter\n    with: {{adapter: {adapter}}}\n"))
    code, _, err = cli_run("check", str(path))
    assert code == 2 and "steps[0] (merge-adapter).with.adapter" in err and "trained on another base" in err


@pytest.mark.parametrize("with_,words", [
    ("{}", ["give either adapter"]),
    ("{adapter: nowhere}", ["adapter directory", "does not exist"]),
    ("{adapters: [{path: a}, {path: b}], combination: ties}", ["needs density"]),
])
def test_merge_adapter_bad_config(tmp_path, cli_run, tiny_text_model, sst2_small, with_, words):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"], f"  - uses: merge-adapter\n    with: {with_}\n"))
    code, _, err = cli_run("check", str(path))
    assert code == 2 and all(w in err for w in words), err


@pytest.mark.slow
def test_a_causal_lm_adapter_merges_as_peft_does(tmp_path, compressor_cache, tiny_llama, sst2_small):
    """A CAUSAL_LM LoRA adapter on the tiny Llama (GQA, tied embeddings): the merged model's next-token
    logits equal the PEFT model's, and the KV-cached ONNX export of it passes parity."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.testing import run_recipe

    torch.manual_seed(3)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(str(adapter))
    steps = (f"  - uses: merge-adapter\n    with: {{adapter: {adapter}}}\n"
             "  - uses: export-onnx\n    with: {atol: 1.0e-3, parity_rows: 4}\n")
    recipe = (f"version: 1\nname: llm-merge\nmodel: {{path: {tiny_llama}, task: text-generation}}\n"
              f"data: {{format: tsv, eval: {sst2_small['eval']}, text: sentence, label: label, "
              f"prompt: \"Review: {{text}}\", completions: {{'0': negative, '1': positive}}}}\n"
              f"steps:\n{steps}evaluate: {{task: {{accuracy_rows: 4, timing_runs: 1, new_tokens: 4, "
              "prompt_tokens: 8}}\n")
    record = run_recipe(recipe, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok(TEXTS, padding=True, return_tensors="pt")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(record["steps"][0]["path"]).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        expected, got, before = (m(**ids).logits for m in (peft_model, merged, base))
    assert torch.allclose(got, expected, atol=1e-5)
    assert (before - expected).abs().max() > 1e-4  # the adapter did change the outputs
    assert record["steps"][1]["notes"]["parity_greedy_identical"] == "4/4"
