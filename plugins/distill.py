"""`distill`: knowledge distillation from a teacher (the fine-tuned model, by default) into the
current artifact, typically just pruned. KL divergence of temperature-softened logits, mixed
with the hard-label loss, plus optional hidden-state MSE with a layer mapping (and a learned
projection where widths differ). Reuses finetune's training loop. Which logits are compared is the
task's business (`Task.distill_pairs`): one row per sentence or tagged word for a classifier, the
next-token distributions of a language model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from compressor.models.artifact import Artifact
from compressor.models.data import TUNE, all_labels
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.step import PlanContext, Step, StepConfig, StepContext
from compressor.models.training import TrainConfig, sample_rows


class DistillConfig(TrainConfig):
    """Settings of `distill`."""

    teacher: str = Field(default="auto", description="auto: the output of the last `finetune` step, else the "
                                                     "recipe's model; `input`; a step name; or a model directory.")
    temperature: float = Field(default=2.0, gt=0, le=50, description="Softmax temperature of the KL term.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the "
                                                              "hard-label loss.")
    hidden_weight: float = Field(default=0.0, ge=0, le=1000, description="Weight of the hidden-state MSE term.")
    layer_map: list[int] | None = Field(default=None, description="Teacher layer (1-based) matched by each student "
                                                                  "layer; default: evenly spaced, last to last.")
    positions: Literal["all", "completion"] | None = Field(
        default=None, description="Language models: the next-token positions the KL term reads — `all` (the "
                                  "default): every token that is not padding, prompt included; `completion`: only "
                                  "those the hard loss reads (the answer and its end of turn). Classifiers refuse it.")
    text_file: str | None = Field(default=None, description="Language models: a plain-text file (one row per "
                                  "non-blank line, e.g. WikiText) whose rows are distilled beside the train rows, "
                                  "every position carrying the KL.")
    text_rows: int | None = Field(default=None, ge=1, le=10_000_000, description="Use a seeded random sample of "
                                  "this many text_file rows (default: all).")
    select_best: bool = Field(default=True, description="With epochs > 1: keep the epoch with the best metric on the "
                                                        "tuning rows (data.validation or data.holdout), never "
                                                        "data.eval; for a language model, the lowest perplexity of "
                                                        "the tokens the hard loss reads.")


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer i (1-based) ↔ teacher layer round(i·T/S): evenly spaced, last matched to last."""
    return [round((i + 1) * teacher_layers / student_layers) for i in range(student_layers)]


class Distill(Step):
    """Knowledge distillation into the current model."""

    name = "distill"
    summary = ("Knowledge distillation from the fine-tuned teacher: softened-logit (or next-token) KL, hard labels, "
               "hidden MSE.")
    version = "3"  # 2: the best epoch is chosen on the tuning rows, not on data.eval; 3: language models
    Config = DistillConfig
    accepts = ("hf",)
    produces = "hf"
    content_fields = ("text_file",)
    needs_data = ("train",)

    def data_splits(self, config: StepConfig) -> tuple[str, ...]:
        """Train rows; with epochs > 1 and select_best, the tuning rows too."""
        assert isinstance(config, DistillConfig)
        return ("train", TUNE) if config.select_best and config.epochs > 1 else ("train",)

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """The task takes `positions` and `text_file`; a teacher given as a directory exists, has the student's
        labels and reads the same token ids."""
        assert isinstance(config, DistillConfig)
        from compressor.tasks import task_for

        task = task_for(ctx.task)
        if config.positions is not None and config.positions not in task.distill_positions:
            raise RecipeError(f"{task.name} models are distilled on their own targets; positions does not apply",
                              where="with.positions", hint="remove positions")
        if config.text_file is not None:
            _check_text_file(config.text_file, task, ctx)
        if config.teacher in ("auto", "input") or not any(c in config.teacher for c in "/."):
            return
        path = ctx.resolve(config.teacher)
        if not (path / "config.json").is_file():
            raise RecipeError(f"teacher {path} is not a model directory (no config.json)", where="with.teacher")
        teacher_config = json.loads((path / "config.json").read_text())
        id2label = teacher_config.get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)]
        if ctx.labels and labels != ctx.labels:
            raise RecipeError(f"the teacher's labels {labels} differ from the student's {ctx.labels}",
                              where="with.teacher", hint="distill from a teacher trained on the same labels")
        _check_teacher_vocabulary(path, teacher_config, ctx)

    def resolve_config(self, config: StepConfig, ctx: PlanContext) -> StepConfig:
        """positions: the task's default where it has any (the record shows what ran); text_file: resolved
        against the recipe's folder, so that its content keys the cache."""
        assert isinstance(config, DistillConfig)
        from compressor.tasks import task_for

        modes = task_for(ctx.task).distill_positions
        if config.positions is None and modes:
            config = config.model_copy(update={"positions": modes[0]})
        if config.text_file is not None:
            config = config.model_copy(update={"text_file": str(ctx.resolve(config.text_file))})
        return config

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Train the student against the teacher; save the best (or last) epoch."""
        assert isinstance(config, DistillConfig)
        import copy

        import torch

        from compressor.models.data import label_ids
        from compressor.models.loading import load_tokenizer
        from compressor.models import load_model, save_model
        from compressor.tasks import task_for
        from compressor.models.training import evaluate_in_memory, train

        ctx.seed_everything()
        teacher_art = resolve_teacher(config.teacher, ctx)
        if teacher_art.labels != artifact.labels:
            raise StepError(f"the teacher's labels {teacher_art.labels} differ from the student's {artifact.labels}")
        if _vocabulary(teacher_art.path) != _vocabulary(artifact.path):
            raise StepError("the teacher and the student use different tokenizers",
                            hint="distill from a teacher with the student's tokenizer, and before trim-vocab, so that "
                                 "both read the same token ids")
        teacher = load_model(teacher_art)
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = load_model(artifact)
        s_layers, t_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        mapping = config.layer_map or default_layer_map(s_layers, t_layers)
        if len(mapping) != s_layers or not all(1 <= m <= t_layers for m in mapping):
            raise StepError(f"layer_map needs {s_layers} entries between 1 and {t_layers}, got {mapping}")
        projection = None
        if config.hidden_weight and student.config.hidden_size != teacher.config.hidden_size:
            projection = torch.nn.Linear(student.config.hidden_size, teacher.config.hidden_size)
        rows = sample_rows(ctx.data.load("train"), config.max_train_rows, ctx.seed)
        spec = task_for(artifact.task)
        # a language model's "labels" are its completions, which collate tokenizes
        label_map = label_ids(artifact.labels, all_labels(rows)) if spec.needs_labels else {}
        text_rows = _text_rows(config, ctx)
        rows = rows + text_rows
        loss_fn = make_loss(teacher, artifact.task, config, mapping, projection)
        tokenizer = load_tokenizer(artifact.path)
        # the epoch is chosen on the tuning rows (data.validation or held-out train rows), never on data.eval,
        # whose figures the report quotes
        tune_rows = ctx.data.load(TUNE) if ctx.data.has(TUNE) else []
        best: dict[str, Any] = {"score": None, "epoch": None, "state": None}
        scores: list[float] = []

        def on_epoch_end(epoch: int) -> None:
            if not (config.select_best and config.epochs > 1 and tune_rows):
                return
            score = evaluate_in_memory(student, tokenizer, tune_rows, artifact.task, artifact.labels,
                                       config.max_length)
            scores.append(score)
            if best["score"] is None or spec.metric.gain(best["score"], score) > 0:
                best.update(score=score, epoch=epoch + 1, state=copy.deepcopy(student.state_dict()))

        params = [p for p in student.parameters() if p.requires_grad]
        params += list(projection.parameters()) if projection is not None else []
        history = train(student, tokenizer, rows, artifact.task, label_map, config.settings(ctx.seed, ctx.threads),
                        loss_fn=loss_fn, params=params, description="distill", on_epoch_end=on_epoch_end)
        if best["state"] is not None:
            student.load_state_dict(best["state"])
        ctx.report(teacher=str(teacher_art.path), train_rows=len(rows) - len(text_rows), layer_map=mapping,
                   epoch_loss=history["epoch_loss"], epoch_scores=scores, kept_epoch=best["epoch"] or config.epochs)
        if scores:
            ctx.report(epoch_metric=spec.metric.name)
        if config.positions is not None:
            ctx.report(positions=config.positions)
        if config.text_file is not None:
            ctx.report(text_rows=len(text_rows))
        return save_model(student, artifact, ctx.out_dir, max_length=config.max_length)


def _check_text_file(spec: str, task: Any, ctx: PlanContext) -> None:
    """text_file: a task that trains on plain text, and a file that exists."""
    if task.needs_labels:
        raise RecipeError(f"text_file gives unlabelled text, and {task.name} models train on labelled rows",
                          where="with.text_file", hint="remove text_file")
    if not ctx.resolve(spec).is_file():
        raise RecipeError(f"{ctx.resolve(spec)} does not exist", where="with.text_file",
                          hint="fix the path (relative to the recipe file)")


def _check_teacher_vocabulary(path: Path, teacher_config: dict[str, Any], ctx: PlanContext) -> None:
    """The teacher's logits must index the student's token ids: same tokenizer, same vocabulary size."""
    if ctx.after("trim-vocab") or ctx.source_path is None or not Path(ctx.source_path).is_dir():
        return  # the student's tokenizer is not the input's: checked when the step runs
    ours, theirs = ctx.model_config.get("vocab_size"), teacher_config.get("vocab_size")
    if _vocabulary(path) != _vocabulary(Path(ctx.source_path)) or (ours and theirs and ours != theirs):
        raise RecipeError(f"the teacher {path} uses a different tokenizer or vocabulary from the student's "
                          f"({theirs} vs {ours} tokens)", where="with.teacher",
                          hint="distill from a teacher that shares the student's tokenizer (the same token ids)")


def _vocabulary(path: Path) -> Any:
    """What decides a tokenizer's token ids: tokenizer.json's model and added tokens, else the vocabulary file."""
    from compressor.models.artifact import TOKENIZER_VOCAB_FILES, hash_file

    file = path / "tokenizer.json"
    if file.is_file():
        spec = json.loads(file.read_text(encoding="utf-8"))
        added = sorted((t.get("id"), t.get("content")) for t in spec.get("added_tokens") or [])
        return {"model": spec.get("model"), "added": added}
    for name in TOKENIZER_VOCAB_FILES:
        if (path / name).is_file():
            return hash_file(path / name)
    return None


def _text_rows(config: DistillConfig, ctx: StepContext) -> list[Any]:
    """The text_file's rows (a seeded sample of text_rows), or none."""
    from compressor.models.data import read_text_rows

    if config.text_file is None:
        return []
    return sample_rows(read_text_rows(ctx.resolve(config.text_file)), config.text_rows, ctx.seed)


def resolve_teacher(spec: str, ctx: StepContext) -> Artifact:
    """The teacher artifact: auto / input / a step name from this run / a model directory."""
    from compressor.recipe.model_input import inspect_model

    if spec == "auto":
        found = [a for name, a in ctx.history if name == "finetune"]
        if found:
            return found[-1]
        return _usable(ctx.source, "the recipe's model")
    if spec == "input":
        return _usable(ctx.source, "the recipe's model")
    named = [a for name, a in ctx.history if name == spec]
    if named:
        return named[-1]
    path = ctx.resolve(spec)
    if not path.is_dir():
        raise StepError(f"teacher {spec!r} is neither a step of this run nor a model directory")
    artifact, _ = inspect_model(path, ctx.source.task, None)
    return artifact


def _usable(artifact: Artifact, what: str) -> Artifact:
    if artifact.info.has_head is False:
        raise StepError(f"{what} has no task head to teach with",
                        hint="fine-tune first (a `finetune` step), or give with.teacher: PATH")
    return artifact


def soft_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """T²·KL(teacher ‖ student) of the temperature-softened distributions, averaged over rows (0 without rows)."""
    import torch.nn.functional as F

    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1),
                    reduction="batchmean") * t * t


def hard_loss(student_logits: Any, labels: Any) -> Any:
    """Cross-entropy against the label ids, averaged over rows (0 without rows)."""
    import torch.nn.functional as F

    if labels.numel() == 0:
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits, labels)


def make_loss(teacher: Any, task: str, config: DistillConfig, mapping: list[int], projection: Any) -> Callable:
    """loss(student, batch) = α·T²·KL(soft teacher ‖ soft student) + (1-α)·CE + β·hidden MSE, on the rows
    the task's `distill_pairs` picks; a task with its own `distill_loss` (sentence embeddings) replaces the
    first two terms."""
    import torch

    from compressor.tasks import task_for

    spec = task_for(task)

    def loss(student: Any, batch: dict) -> Any:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = config.hidden_weight > 0
        out = student(**inputs, output_hidden_states=hidden)
        with torch.no_grad():
            ref = teacher(**inputs, output_hidden_states=hidden)
        total = spec.distill_loss(out.logits, ref.logits, labels, inputs.get("attention_mask"))
        if total is None:
            pairs = spec.distill_pairs(out.logits, ref.logits, labels, inputs.get("attention_mask"), config.positions)
            total = (config.alpha * soft_loss(pairs.soft_student, pairs.soft_teacher, config.temperature)
                     + (1 - config.alpha) * hard_loss(pairs.hard_student, pairs.hard_labels))
        if hidden:
            total = total + config.hidden_weight * hidden_mse(out.hidden_states, ref.hidden_states, mapping,
                                                              inputs["attention_mask"], projection)
        return total

    return loss


def hidden_mse(student_states: Any, teacher_states: Any, mapping: list[int], attention_mask: Any,
               projection: Any) -> Any:
    """Mean squared error between each student layer's output and its mapped teacher layer, over real tokens."""
    mask = attention_mask.unsqueeze(-1).float()
    mse = 0.0
    for s_index, t_index in enumerate(mapping, start=1):
        s_h = student_states[s_index]
        s_h = projection(s_h) if projection is not None else s_h
        mse = mse + (((s_h - teacher_states[t_index]) ** 2) * mask).sum() / (mask.sum() * s_h.shape[-1])
    return mse / len(mapping)


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `distill` step."""
    register(Distill)
