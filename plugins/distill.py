"""`distill`: knowledge distillation from a teacher (the fine-tuned model, by default) into the
current artifact, typically just pruned. KL divergence of temperature-softened logits, mixed
with the hard-label loss, plus optional hidden-state MSE with a layer mapping (and a learned
projection where widths differ). Reuses finetune's training loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from compressor.artifact import Artifact
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.step import PlanContext, Step, StepConfig, StepContext
from compressor.data import TUNE, all_labels
from compressor.training import TrainConfig, sample_rows


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
    select_best: bool = Field(default=True, description="With epochs > 1: keep the epoch with the best metric on the "
                                                        "tuning rows (data.validation or data.holdout), never "
                                                        "data.eval.")


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer i (1-based) ↔ teacher layer round(i·T/S): evenly spaced, last matched to last."""
    return [round((i + 1) * teacher_layers / student_layers) for i in range(student_layers)]


class Distill(Step):
    """Knowledge distillation into the current model."""

    name = "distill"
    summary = "Knowledge distillation from the fine-tuned teacher: softened-logit KL, hard labels, hidden MSE."
    version = "2"  # 2: the best epoch is chosen on the tuning rows, not on data.eval
    Config = DistillConfig
    accepts = ("hf",)
    produces = "hf"
    needs_data = ("train",)

    def data_splits(self, config: StepConfig) -> tuple[str, ...]:
        """Train rows; with epochs > 1 and select_best, the tuning rows too."""
        assert isinstance(config, DistillConfig)
        return ("train", TUNE) if config.select_best and config.epochs > 1 else ("train",)

    def supports(self, config: StepConfig, task: Any, model_config: dict[str, Any]) -> str | None:
        """Classifiers only: distillation on a language model's next-token distributions is not built yet."""
        if not task.needs_labels:
            return (f"distill teaches a classifier's soft labels; {task.name} models (next-token distillation) "
                    "are not supported yet")
        return None

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """A teacher given as a directory must exist and have the student's labels."""
        assert isinstance(config, DistillConfig)
        if config.teacher in ("auto", "input") or not any(c in config.teacher for c in "/."):
            return
        path = ctx.resolve(config.teacher)
        if not (path / "config.json").is_file():
            raise RecipeError(f"teacher {path} is not a model directory (no config.json)", where="with.teacher")
        id2label = json.loads((path / "config.json").read_text()).get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)]
        if ctx.labels and labels != ctx.labels:
            raise RecipeError(f"the teacher's labels {labels} differ from the student's {ctx.labels}",
                              where="with.teacher", hint="distill from a teacher trained on the same labels")

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Train the student against the teacher; save the best (or last) epoch."""
        assert isinstance(config, DistillConfig)
        import copy

        import torch

        from compressor.data import label_ids
        from compressor.evaluators.runtime import load_tokenizer
        from compressor.models import load_model, save_model
        from compressor.tasks import task_for
        from compressor.training import evaluate_in_memory, train

        ctx.seed_everything()
        teacher_art = resolve_teacher(config.teacher, ctx)
        if teacher_art.labels != artifact.labels:
            raise StepError(f"the teacher's labels {teacher_art.labels} differ from the student's {artifact.labels}")
        if _vocab_file(teacher_art.path) != _vocab_file(artifact.path):
            raise StepError("the teacher and the student use different tokenizers",
                            hint="distill before trim-vocab, so that both read the same token ids")
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
        label_map = label_ids(artifact.labels, all_labels(rows))
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
            if best["score"] is None or task_for(artifact.task).metric.gain(best["score"], score) > 0:
                best.update(score=score, epoch=epoch + 1, state=copy.deepcopy(student.state_dict()))

        params = [p for p in student.parameters() if p.requires_grad]
        params += list(projection.parameters()) if projection is not None else []
        history = train(student, tokenizer, rows, artifact.task, label_map, config.settings(ctx.seed, ctx.threads),
                        loss_fn=loss_fn, params=params, description="distill", on_epoch_end=on_epoch_end)
        if best["state"] is not None:
            student.load_state_dict(best["state"])
        ctx.report(teacher=str(teacher_art.path), train_rows=len(rows), layer_map=mapping,
                   epoch_loss=history["epoch_loss"], epoch_scores=scores, kept_epoch=best["epoch"] or config.epochs)
        return save_model(student, artifact, ctx.out_dir, max_length=config.max_length)


def _vocab_file(path: Path) -> str | None:
    from compressor.artifact import hash_file

    for name in ("tokenizer.json", "vocab.txt"):
        if (path / name).is_file():
            return hash_file(path / name)
    return None


def resolve_teacher(spec: str, ctx: StepContext) -> Artifact:
    """The teacher artifact: auto / input / a step name from this run / a model directory."""
    from compressor.plan import inspect_model

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
    if not artifact.info.get("has_head", True):
        raise StepError(f"{what} has no task head to teach with",
                        hint="fine-tune first (a `finetune` step), or give with.teacher: PATH")
    return artifact


def make_loss(teacher: Any, task: str, config: DistillConfig, mapping: list[int], projection: Any) -> Callable:
    """loss(student, batch) = α·T²·KL(soft teacher ‖ soft student) + (1-α)·CE + β·hidden MSE."""
    import torch
    import torch.nn.functional as F

    from compressor.tasks import task_for

    t = config.temperature
    spec = task_for(task)

    def loss(student: Any, batch: dict) -> Any:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = config.hidden_weight > 0
        out = student(**inputs, output_hidden_states=hidden)
        with torch.no_grad():
            ref = teacher(**inputs, output_hidden_states=hidden)
        s_logits, t_logits = out.logits, ref.logits
        s_logits, t_logits, labels = spec.distill_targets(s_logits, t_logits, labels)
        kd = F.kl_div(F.log_softmax(s_logits / t, -1), F.softmax(t_logits / t, -1), reduction="batchmean") * t * t
        total = config.alpha * kd + (1 - config.alpha) * F.cross_entropy(s_logits, labels)
        if hidden:
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            mse = 0.0
            for s_index, t_index in enumerate(mapping, start=1):
                s_h = out.hidden_states[s_index]
                s_h = projection(s_h) if projection is not None else s_h
                mse = mse + (((s_h - ref.hidden_states[t_index]) ** 2) * mask).sum() / (mask.sum() * s_h.shape[-1])
            total = total + config.hidden_weight * mse / len(mapping)
        return total

    return loss


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `distill` step."""
    register(Distill)
