"""distill for text-generation on tiny Llamas built from a config: the loss on next-token distributions
(every real position, or the completion only) checked against a hand computation, a perturbed student
brought back to its teacher, finetune(lora) → distill through the real pipeline, a one-layer student of a
two-layer teacher on plain text, and the recipes check refuses."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from compressor.testing import require_data

PROMPT = "  prompt: \"Review: {text}\\nSentiment:\"\n  completions: {'0': negative, '1': positive}\n"


@pytest.fixture(scope="module")
def wikitext_lines(tmp_path_factory) -> dict[str, Path]:
    """Real WikiText-2 lines: 300 non-blank validation lines to train on, the first 100 test lines to score."""
    src = require_data("wikitext-2/valid.txt", "wikitext-2/test.txt") / "wikitext-2"
    d = tmp_path_factory.mktemp("wikitext-lines")
    valid = [l for l in src.joinpath("valid.txt").read_text(encoding="utf-8").splitlines() if l.strip()][:300]
    (d / "train.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")
    test = src.joinpath("test.txt").read_text(encoding="utf-8").splitlines()[:100]
    (d / "test.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    return {"train": d / "train.txt", "test": d / "test.txt"}


def variant(src: Path, out: Path, seed: int, **config: Any) -> Path:
    """A freshly initialised Llama with `src`'s tokenizer and config, changed by `config` (e.g. fewer layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.models import copy_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(src, out)
    settings = {**LlamaConfig.from_pretrained(str(src)).to_dict(), **config}
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(str(out), safe_serialization=True)
    return out


def drop_layers(src: Path, out: Path, keep: int) -> Path:
    """`src` with only its first `keep` decoder layers, as layer dropping leaves a model."""
    from transformers import AutoModelForCausalLM

    from compressor.models import copy_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src))
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer(src, out)
    return out


def recipe(model: Path, train: Path, steps: str, eval_: Path | None = None, data_extra: str = PROMPT,
           fmt: str = "tsv", corpus: Path | None = None) -> str:
    """A text-generation recipe without latency (the evaluator's perplexity on `corpus`, if given)."""
    data = f"data:\n  format: {fmt}\n  train: {train}\n" + (f"  eval: {eval_}\n" if eval_ else "")
    data += "  text: sentence\n  label: label\n" if fmt == "tsv" else ""
    task = (f"  task: {{perplexity_file: {corpus}, perplexity_tokens: 256, window: 128, accuracy_rows: 8}}\n"
            if corpus else "")
    return (f"version: 1\nname: tiny-llm-distill\nmodel: {{path: {model}, task: text-generation}}\n{data}"
            f"{data_extra}steps:\n{steps}evaluate:\n  latency: null\n{task}")


def fake_model(logits: Any) -> Any:
    """A stand-in for a causal LM that returns fixed logits."""
    return lambda **inputs: SimpleNamespace(logits=logits, hidden_states=None)


def hand_batch(seed: int = 0) -> dict:
    """Two right-padded rows over a vocabulary of 7: a prompt and its completion, and a plain-text row."""
    import torch

    torch.manual_seed(seed)
    ids = torch.randint(3, 7, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 5, 2, -100],  # prompt of 3, completion + end of turn
                           [4, 6, 3, 5, -100, -100]])  # plain text: every real token counts
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def manual_kl(student: Any, teacher: Any, positions: list[tuple[int, int]], t: float) -> float:
    """T² · mean over (row, position) of KL(softmax(teacher/T) ‖ softmax(student/T)), summed by hand."""
    import torch

    total = 0.0
    for b, i in positions:
        p = torch.softmax(teacher[b, i] / t, -1)
        q = torch.softmax(student[b, i] / t, -1)
        total += float((p * (p.log() - q.log())).sum())
    return t * t * total / len(positions)


def distill_loss(student_logits: Any, teacher_logits: Any, batch: dict, **config: Any) -> float:
    """distill's loss for one batch, with models that return the given logits."""
    from compressor.plugins.distill import DistillConfig, make_loss

    from compressor.host import build_host

    build_host()
    loss = make_loss(fake_model(teacher_logits), "text-generation", DistillConfig(**config), [1], None)
    return float(loss(fake_model(student_logits), batch))


def test_the_kl_term_is_zero_when_the_student_is_the_teacher():
    import torch

    batch = hand_batch()
    logits = torch.randn(2, 6, 7) * 3
    for positions in ("all", "completion"):
        assert abs(distill_loss(logits, logits.clone(), batch, alpha=1.0, positions=positions)) < 1e-6
    # alpha 0: only the hard loss, the cross-entropy of the labelled next tokens (as the model's own loss)
    hard = distill_loss(logits, logits.clone(), batch, alpha=0.0)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100)
    assert hard == pytest.approx(float(want), rel=1e-6)


def test_positions_choose_which_next_tokens_the_kl_reads():
    import torch

    batch = hand_batch()
    student, teacher = torch.randn(2, 6, 7) * 2, torch.randn(2, 6, 7) * 2
    # position i predicts token i+1: the completion is predicted from positions 2 and 3 of row 0, plain text
    # from 0..2 of row 1; `all` adds the prompt positions 0 and 1 of row 0 (never a padded next token)
    completion = [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    every = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    for t in (1.0, 2.0):
        for positions, where in (("completion", completion), ("all", every)):
            got = distill_loss(student, teacher, batch, alpha=1.0, temperature=t, positions=positions)
            assert got == pytest.approx(manual_kl(student, teacher, where, t), rel=1e-5)
    # a teacher that differs only at prompt and padded positions changes `all`, and not `completion`
    changed = teacher.clone()
    changed[0, 0:2] += torch.randn(2, 7) * 5
    changed[0, 4:] += 9.0
    changed[1, 3:] -= 9.0
    assert distill_loss(student, changed, batch, alpha=1.0, positions="completion") == pytest.approx(
        distill_loss(student, teacher, batch, alpha=1.0, positions="completion"), rel=1e-6)
    assert abs(distill_loss(student, changed, batch, alpha=1.0, positions="all")
               - distill_loss(student, teacher, batch, alpha=1.0, positions="all")) > 1e-3
    # the default for a language model is every position
    assert distill_loss(student, teacher, batch, alpha=1.0) == pytest.approx(manual_kl(student, teacher, every, 2.0),
                                                                              rel=1e-5)


def next_token_kl(student: Any, teacher: Any, tokenizer: Any, rows: list) -> float:
    """Mean KL(teacher ‖ student) of the next-token distributions at every real position of `rows`."""
    import torch
    import torch.nn.functional as F

    from compressor.tasks.text_generation import TextGeneration

    task = TextGeneration()
    batch = task.collate(tokenizer, rows, {}, 64)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        pairs = task.distill_pairs(student(**inputs).logits, teacher(**inputs).logits, batch["labels"],
                                   batch["attention_mask"], "all")
    return float(F.kl_div(F.log_softmax(pairs.soft_student, -1), F.log_softmax(pairs.soft_teacher, -1),
                          log_target=True, reduction="batchmean"))


def test_distilling_brings_a_perturbed_student_back_to_its_teacher(tiny_llama, sst2_small):
    import torch
    from compressor.plugins.distill import DistillConfig, make_loss
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compressor.models.data import DataSource
    from compressor.host import build_host
    from compressor.models.training import train

    build_host()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    torch.manual_seed(0)  # a teacher with sharper distributions than a fresh model's near-uniform ones
    teacher = LlamaForCausalLM(LlamaConfig(**{**LlamaConfig.from_pretrained(str(tiny_llama)).to_dict(),
                                              "initializer_range": 0.1})).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn_like(p) * 0.1)
    data = DataSource("tsv", sst2_small, "sentence", "label", prompt="Review: {text}\nSentiment:",
                      completions={"0": "negative", "1": "positive"})
    rows, held_out = data.load("train")[:240], data.load("eval")[:32]
    before = next_token_kl(student, teacher, tokenizer, held_out)
    config = DistillConfig(temperature=1.0, alpha=1.0, positions="all", batch_size=8, learning_rate=1e-2,
                           max_length=64)
    history = train(student, tokenizer, rows, "text-generation", {}, config.settings(0, 2),
                    loss_fn=make_loss(teacher, "text-generation", config, [1, 2], None))
    after = next_token_kl(student, teacher, tokenizer, held_out)
    assert history["steps"] == 30
    assert before > 0.2 and after < 0.5 * before, (before, after)


def test_finetune_lora_then_distill_through_the_pipeline(tmp_path, tiny_llama, sst2_small, wikitext_lines):
    from compressor.testing import run_recipe

    steps = ("  - uses: finetune\n    with: {method: lora, lora_target_modules: [q_proj, v_proj], epochs: 1, "
             "learning_rate: 1.0e-2, batch_size: 16, max_train_rows: 128, max_length: 48}\n"
             "  - uses: distill\n    with: {epochs: 3, learning_rate: 5.0e-3, batch_size: 16, max_train_rows: 64, "
             "max_length: 48, text_file: " + str(wikitext_lines["train"]) + ", text_rows: 32}\n")
    text = recipe(tiny_llama, sst2_small["train"], steps, eval_=sst2_small["eval"], corpus=wikitext_lines["test"],
                  data_extra=PROMPT + "  holdout: 32\n")
    record = run_recipe(text, tmp_path, cache=tmp_path / "cache")
    notes = next(s for s in record["steps"] if s["uses"] == "distill")["notes"]
    assert Path(notes["teacher"]).name.endswith("finetune")
    assert notes["positions"] == "all" and notes["train_rows"] == 64 and notes["text_rows"] == 32
    assert notes["layer_map"] == [1, 2]
    losses = notes["epoch_loss"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    # the epoch is kept on the held-out rows' perplexity, which is better when lower
    scores = notes["epoch_scores"]
    assert notes["epoch_metric"] == "perplexity" and len(scores) == 3 and all(s > 1 for s in scores)
    assert notes["kept_epoch"] == 1 + scores.index(min(scores))
    arts = {a["name"]: a for a in record["artifacts"]}
    assert arts["distill"]["metric"] == "perplexity" and arts["distill"]["perplexity"] > 1


def load_lm(path: Path) -> Any:
    """A saved causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_a_one_layer_student_learns_a_two_layer_teacher_on_plain_text(tmp_path, tiny_llama, wikitext_lines):
    from transformers import AutoTokenizer

    from compressor.models.data import Example
    from compressor.testing import run_recipe

    teacher_dir = variant(tiny_llama, tmp_path / "teacher", seed=0, initializer_range=0.1)
    student_dir = drop_layers(teacher_dir, tmp_path / "student", keep=1)
    steps = (f"  - uses: distill\n    with: {{teacher: {teacher_dir}, temperature: 1.0, alpha: 1.0, hidden_weight: 0.1, "
             "epochs: 2, learning_rate: 5.0e-3, batch_size: 8, max_length: 48, max_train_rows: 160}\n")
    record = run_recipe(recipe(student_dir, wikitext_lines["train"], steps, data_extra="  holdout: 16\n", fmt="text"),
                        tmp_path / "r", cache=tmp_path / "cache")
    notes = record["steps"][0]["notes"]
    assert notes["layer_map"] == [2] and notes["train_rows"] == 160 and notes["positions"] == "all"
    # the tuning rows are plain text too: the kept epoch has the lower perplexity on every one of their tokens
    assert notes["kept_epoch"] == 1 + notes["epoch_scores"].index(min(notes["epoch_scores"]))
    out = Path(record["steps"][0]["path"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    held_out = [Example(l, None) for l in wikitext_lines["test"].read_text().splitlines() if l.strip()][:32]
    teacher = load_lm(teacher_dir)
    before = next_token_kl(load_lm(student_dir), teacher, tokenizer, held_out)
    after = next_token_kl(load_lm(out), teacher, tokenizer, held_out)
    assert after < 0.75 * before, (before, after)


@pytest.mark.parametrize("case, message", [
    ("tokenizer", "uses a different tokenizer or vocabulary from the student's"),
    ("text-file", "does not exist"),
    ("classifier-positions", "positions does not apply"),
    ("classifier-text", "text_file gives unlabelled text"),
])
def test_check_refuses_what_distill_cannot_do(case, message, tmp_path, cli_run, tiny_llama, tiny_text_model,
                                              sst2_small):
    from compressor.testing import build_tiny_llama

    steps = "  - uses: distill\n"
    text = recipe(tiny_llama, sst2_small["train"], steps)
    if case == "tokenizer":
        other = build_tiny_llama(tmp_path / "other", ["a teacher that learnt other words entirely"] * 20)
        text = text.replace(steps, f"  - uses: distill\n    with: {{teacher: {other}}}\n")
    if case == "text-file":
        text = text.replace(steps, f"  - uses: distill\n    with: {{text_file: {tmp_path / 'missing.txt'}}}\n")
    if case.startswith("classifier"):
        setting = "positions: all" if case == "classifier-positions" else f"text_file: {sst2_small['train']}"
        text = (f"version: 1\nname: c\nmodel: {{path: {tiny_text_model}, task: text-classification}}\n"
                f"data: {{format: tsv, train: {sst2_small['train']}, text: sentence, label: label}}\n"
                f"steps:\n  - uses: distill\n    with: {{{setting}}}\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, out, err = cli_run("check", str(path))
    assert code == 2, (out, err)
    assert message in err and "steps[0] (distill).with." in err and "Traceback" not in err
