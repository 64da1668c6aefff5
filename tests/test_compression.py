"""prune, distill and trim-vocab on tiny BERTs and real SST-2 rows: structure, reload, export
parity, and the numbers each promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load_file

from conftest import recipe_text


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    """A tiny classifier with 4 layers and 4 heads (so that there is something to prune)."""
    from compressor.testing import build_tiny_model, sst2_words

    return build_tiny_model(tmp_path_factory.mktemp("tiny4"), "text-classification", ["negative", "positive"],
                            sst2_words(), num_hidden_layers=4, num_attention_heads=4)


def _run(tmp_path, model, data, steps: str, **kw):
    from compressor.testing import run_recipe

    return run_recipe(recipe_text(model, data["train"], data["eval"], steps, **kw), tmp_path)


def _rows_of(matrix):
    return {tuple(r.round(6)) for r in matrix}


def test_prune_is_structural_and_reloads(tmp_path, compressor_cache, tiny4, sst2_small):
    from transformers import AutoModelForSequenceClassification

    record = _run(tmp_path, tiny4, sst2_small,
                  "  - uses: prune\n    with: {target: ffn, ratio: 0.5, keep_layers: [0, 3]}\n"
                  "  - uses: export-onnx\n")
    out = Path(record["steps"][0]["path"])
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 32
    before, after = load_file(str(tiny4 / "model.safetensors")), load_file(str(out / "model.safetensors"))
    # kept layer 1 is original layer 3; its FFN rows are a subset of the original rows, and the
    # output projection kept the matching columns
    w_in, w_in0 = after["bert.encoder.layer.1.intermediate.dense.weight"], before["bert.encoder.layer.3.intermediate.dense.weight"]
    kept = [next(j for j, r in enumerate(w_in0) if (abs(r - row) < 1e-7).all()) for row in w_in]
    assert len(set(kept)) == 32
    w_out0 = before["bert.encoder.layer.3.output.dense.weight"]
    assert (abs(after["bert.encoder.layer.1.output.dense.weight"] - w_out0[:, kept]) < 1e-7).all()
    # attention is kept whole: kept layer 0's query projection is original layer 0's
    q, q0 = after["bert.encoder.layer.0.attention.self.query.weight"], before["bert.encoder.layer.0.attention.self.query.weight"]
    assert (abs(q - q0) < 1e-7).all()
    notes = record["steps"][0]["notes"]
    assert notes["macs_after"] < notes["macs_before"] * 0.45 and notes["params_after"] < notes["params_before"]
    assert record["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4


def test_prune_keeps_the_strongest_ffn_neurons(tmp_path, compressor_cache, tiny4, sst2_small):
    record = _run(tmp_path, tiny4, sst2_small, "  - uses: prune\n    with: {target: ffn, ratio: 0.75}\n")
    before = load_file(str(tiny4 / "model.safetensors"))
    after = load_file(str(Path(record["steps"][0]["path"]) / "model.safetensors"))
    w0, b0 = before["bert.encoder.layer.0.intermediate.dense.weight"], before["bert.encoder.layer.0.intermediate.dense.bias"]
    wo0 = before["bert.encoder.layer.0.output.dense.weight"]
    kept = sorted(next(j for j, r in enumerate(w0) if (abs(r - row) < 1e-7).all())
                  for row in after["bert.encoder.layer.0.intermediate.dense.weight"])
    strength = (w0 ** 2).sum(1) + b0 ** 2 + (wo0 ** 2).sum(0)
    dropped = [j for j in range(64) if j not in kept]
    assert len(kept) == 16
    # group magnitude normalises each layer's share before summing, so compare in aggregate and at the extremes
    assert strength[kept].mean() > 1.2 * strength[dropped].mean()
    assert int(strength.argmax()) in kept and int(strength.argmin()) in dropped


@pytest.mark.parametrize("with_,words", [
    ("{keep_layers: [0, 7]}", ["layer index 7 is out of range: the model has 4 layers"]),
    ("{target: ffn, ratio: 1.0}", ["steps[0] (prune).with.ratio", "less than 1"]),
    ("{target: heads, ratio: 0.5}", ["steps[0] (prune).with.target", "transformers 5 removed",
                                     "target: ffn"]),
    ("{keep: 2, keep_layers: [0]}", ["keep_layers or keep, not both"]),
    ("{}", ["nothing to prune"]),
])
def test_prune_bad_config_is_caught_by_check(tmp_path, cli_run, tiny4, sst2_small, with_, words):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny4, sst2_small["train"], sst2_small["eval"], f"  - uses: prune\n    with: {with_}\n"))
    code, _, err = cli_run("check", str(path))
    assert code == 2 and all(w in err for w in words), err


@pytest.mark.slow
def test_distill_recovers_pruned_accuracy(tmp_path, compressor_cache, tiny_encoder, sst2_small):
    steps = ("  - uses: finetune\n    with: {epochs: 3, learning_rate: 2.0e-3}\n"
             "  - uses: prune\n    with: {target: ffn, ratio: 0.5, keep: 1}\n"
             "  - uses: distill\n    with: {epochs: 2, learning_rate: 2.0e-3, hidden_weight: 1.0}\n")
    record = _run(tmp_path, tiny_encoder, sst2_small, steps, labels=", labels: [negative, positive]",
                  data_extra="  holdout: 200\n")
    acc = {a["name"]: a["accuracy"] for a in record["artifacts"] if "accuracy" in a}
    assert acc["prune"] < acc["finetune"]  # one of two layers left hurts
    assert acc["distill"] >= acc["prune"] + 0.03
    notes = record["steps"][2]["notes"]
    assert notes["teacher"].endswith("01-finetune") and notes["layer_map"] == [2]
    # the kept epoch is the best on the 200 held-out tuning rows (not on data.eval)
    scores = notes["epoch_scores"]
    assert len(scores) == 2 and notes["kept_epoch"] == 1 + scores.index(max(scores))


def test_distill_teacher_with_other_labels(tmp_path, cli_run, tiny_text_model, tiny_token_model, sst2_small):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                f"  - uses: distill\n    with: {{teacher: {tiny_token_model}}}\n"))
    code, _, err = cli_run("check", str(path))
    assert code == 2 and "the teacher's labels" in err and "differ from the student's" in err


def test_trim_vocab_keeps_training_text_exact(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compressor.models.data import DataSource

    record = _run(tmp_path, tiny_text_model, sst2_small, "  - uses: trim-vocab\n  - uses: export-onnx\n")
    out = Path(record["steps"][0]["path"])
    notes = record["steps"][0]["notes"]
    assert notes["rows_kept"] < notes["rows_before"] * 0.9
    texts = [r.text for r in DataSource("tsv", {"train": sst2_small["train"]}, "sentence", "label").load("train")][:300]
    old_tok, new_tok = AutoTokenizer.from_pretrained(tiny_text_model), AutoTokenizer.from_pretrained(out)
    assert new_tok.vocab_size == notes["rows_kept"]
    for text in texts[:100]:
        assert old_tok.tokenize(text) == new_tok.tokenize(text)
    old_model = AutoModelForSequenceClassification.from_pretrained(tiny_text_model).eval()
    new_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        a = old_model(**old_tok(texts, padding=True, return_tensors="pt")).logits.numpy()
        b = new_model(**new_tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(a - b).max() < 1e-5
    # an unseen word falls back to characters, not [UNK]
    assert "[UNK]" not in new_tok.tokenize("zqxjv")
    assert record["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4
    assert 0 < notes["eval_rows_tokenized_identically"] <= 1


def test_trim_vocab_keeps_the_tokens_of_a_text_file(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from transformers import AutoTokenizer

    from compressor.models.data import DataSource

    old_tok = AutoTokenizer.from_pretrained(tiny_text_model)
    train = DataSource("tsv", {"train": sst2_small["train"]}, "sentence", "label").load("train")
    used = {p for r in train for p in old_tok.tokenize(r.text)}
    unused = sorted(t for t in old_tok.get_vocab() if t.isalpha() and len(t) > 3 and t not in used)
    extra = " ".join(unused[:5])  # whole words of the vocabulary that no train row uses
    assert not set(old_tok.tokenize(extra)) <= used  # the train rows alone would drop some of its pieces
    text = tmp_path / "vocabulary.txt"
    text.write_text(f"\n{extra}\n\n", encoding="utf-8")
    record = _run(tmp_path, tiny_text_model, sst2_small, f"  - uses: trim-vocab\n    with: {{text_file: {text}}}\n")
    notes = record["steps"][0]["notes"]
    new_tok = AutoTokenizer.from_pretrained(Path(record["steps"][0]["path"]))
    assert notes["text_file_rows"] == 1 and new_tok.vocab_size == notes["rows_kept"]
    assert new_tok.tokenize(extra) == old_tok.tokenize(extra)
    for r in train[:100]:
        assert new_tok.tokenize(r.text) == old_tok.tokenize(r.text)


def test_distill_after_trim_vocab_is_refused(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from compressor.errors import StepError

    with pytest.raises(StepError, match="different tokenizers"):
        _run(tmp_path, tiny_text_model, sst2_small,
             "  - uses: trim-vocab\n  - uses: distill\n    with: {teacher: input, max_train_rows: 64}\n")


def test_trim_vocab_keeps_added_tokens(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    """A token added with tokenizer.add_tokens lives outside the WordPiece vocab; it is kept and remapped."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = tmp_path / "with-added"
    shutil.copytree(tiny_text_model, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(["<product>"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    record = _run(tmp_path, model_dir, sst2_small, "  - uses: trim-vocab\n  - uses: export-onnx\n")
    out = Path(record["steps"][0]["path"])
    new_tok = AutoTokenizer.from_pretrained(out)
    assert new_tok.tokenize("<product> is good") == tok.tokenize("<product> is good")
    assert new_tok.convert_tokens_to_ids("<product>") == record["steps"][0]["notes"]["rows_kept"] - 1
    assert record["steps"][1]["notes"]["parity_max_abs_diff"] < 1e-4
