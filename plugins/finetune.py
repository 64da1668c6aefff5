"""`finetune`: train an `hf` model on the recipe's train data: full, head-only, BitFit or LoRA."""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field

from compressor.models.artifact import Artifact
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.step import PlanContext, Step, StepConfig, StepContext
from compressor.models.data import all_labels
from compressor.models.training import TrainConfig, sample_rows


class FinetuneConfig(TrainConfig):
    """Settings of `finetune`."""

    method: Literal["full", "head", "bitfit", "lora"] = Field(
        default="full", description="What is trained: every weight, the task head only, the biases (BitFit), "
                                    "or LoRA adapters (peft).")
    lora_r: int = Field(default=8, ge=1, le=1024, description="LoRA rank (method: lora).")
    lora_alpha: int = Field(default=16, ge=1, le=4096, description="LoRA scaling numerator (method: lora).")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout (method: lora).")
    lora_target_modules: list[str] | None = Field(
        default=None, description="Modules that get adapters (method: lora); default: peft's choice for the model "
                    "type, or every Linear but the output head where peft has none.")
    loss: str | None = Field(default=None, description="The training loss, where the task offers several "
                             "(sentence-embedding: cosent, the default, or cosine); default: the task's.")
    merge: bool = Field(default=True, description="method: lora — also merge the adapter into the model; "
                                                  "the adapter is saved under adapter/ either way.")


def _numeric_sort(labels: set[str]) -> list[str]:
    return sorted(labels, key=lambda x: (0, int(x), x) if x.isdigit() else (1, 0, x))


class Finetune(Step):
    """Fine-tune a model (adding a task head when it has none) on the recipe's train split."""

    name = "finetune"
    summary = "Fine-tune on the recipe's train data: full, head-only, BitFit or LoRA."
    version = "1"
    Config = FinetuneConfig
    accepts = ("hf",)
    produces = "hf"
    needs_data = ("train",)

    def output_labels(self, config: StepConfig, ctx: PlanContext) -> list[str]:
        """The model's labels, or, for a model without a head, the labels found in the train data."""
        from compressor.tasks import task_for

        if ctx.labels or not task_for(ctx.task).needs_labels:
            return ctx.labels
        if ctx.data is None or not ctx.data.has("train") or not ctx.data.splits["train"].exists():
            return []
        return _numeric_sort(ctx.data.label_set("train"))

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """LoRA needs peft; the rest needs nothing beyond the data."""
        assert isinstance(config, FinetuneConfig)
        from compressor.tasks import task_for

        losses = task_for(ctx.task).train_losses
        if config.loss is not None and config.loss not in losses:
            raise RecipeError(f"{ctx.task} models train with " + (f"loss {' or '.join(losses)}, not {config.loss!r}"
                              if losses else f"their own loss; loss {config.loss!r} does not apply"),
                              where="with.loss", hint=f"use one of {', '.join(losses)}" if losses else "remove loss")
        if config.method == "lora":
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise RecipeError("method 'lora' needs peft", where="with.method", hint="pip install peft")

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Train and save the model (and the LoRA adapter) into ctx.out_dir."""
        import torch
        from transformers import AutoConfig

        from compressor.models.data import label_ids
        from compressor.models.loading import load_tokenizer
        from compressor.models.training import train

        assert isinstance(config, FinetuneConfig)
        ctx.seed_everything()
        from compressor.tasks import task_for

        rows = sample_rows(ctx.data.load("train"), config.max_train_rows, ctx.seed)
        if task_for(artifact.task).needs_labels:
            labels = artifact.labels or _numeric_sort(ctx.data.label_set("train"))  # as the plan said
            label_map = label_ids(labels, all_labels(rows))
        else:  # a language model's "labels" are its completions, which collate tokenizes
            labels, label_map = [], {}
        tokenizer = load_tokenizer(artifact.path)
        model = _load_with_head(artifact, labels, AutoConfig)
        trainable, frozen_note = _select_parameters(model, config)
        if config.method == "lora":
            model = _wrap_lora(model, artifact.task, config)
            trainable = [p for p in model.parameters() if p.requires_grad]
            # peft trains a classifier's new head beside the adapters; a language model has no new head
            frozen_note = "LoRA adapters" + (" and task head" if task_for(artifact.task).needs_labels else "")
        n_trained = sum(p.numel() for p in trainable)
        n_total = sum(p.numel() for p in model.parameters())
        ctx.report(method=config.method, trained_parameters=n_trained, total_parameters=n_total,
                   train_rows=len(rows), note=frozen_note)
        history = train(model, tokenizer, rows, artifact.task, label_map, config.settings(ctx.seed, ctx.threads),
                        params=trainable, loss_fn=task_for(artifact.task).train_loss(config.loss),
                        description=f"finetune ({config.method})")
        ctx.report(epoch_loss=history["epoch_loss"], optimizer_steps=history["steps"])
        info: dict[str, Any] = {"method": config.method, "max_length": config.max_length}
        if config.method == "lora":
            model.save_pretrained(str(ctx.out_dir / "adapter"))
            if config.merge:
                model = model.merge_and_unload(safe_merge=True)
            else:
                model = model.unload()  # drop the LoRA layers unmerged: the saved base keeps its own weights
                info["adapter"] = "adapter"
        with torch.no_grad():
            model.save_pretrained(str(ctx.out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(ctx.out_dir))
        out = artifact.derive(ctx.out_dir, **info)
        out.labels = labels
        return out


def _load_with_head(artifact: Artifact, labels: list[str], AutoConfig: Any) -> Any:
    """Load the model with a task head sized for `labels` (a new head if it had none)."""
    from compressor.models.loading import load_torch_model
    from compressor.tasks import task_for

    if artifact.info.has_head is not False and (artifact.labels or not task_for(artifact.task).needs_labels):
        return load_torch_model(artifact.path, artifact.task)
    cls = task_for(artifact.task).model_class()
    config = AutoConfig.from_pretrained(str(artifact.path), num_labels=len(labels),
                                        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    try:
        return cls.from_pretrained(str(artifact.path), config=config, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise StepError(f"cannot load the model in {artifact.path}: {exc}") from None


def _head_prefix(model: Any) -> Callable[[str], bool]:
    base = model.base_model_prefix
    return lambda name: not name.startswith(base + ".")


def _select_parameters(model: Any, config: FinetuneConfig) -> tuple[list[Any], str]:
    """Freeze what the method does not train; return the trainable parameters."""
    is_head = _head_prefix(model)
    keep: Callable[[str], bool]
    if config.method == "head":
        keep, note = is_head, "task head only"
    elif config.method == "bitfit":
        keep, note = (lambda n: is_head(n) or n.endswith(".bias")), "biases and task head (BitFit)"
    else:
        keep, note = (lambda n: True), "all parameters" if config.method == "full" else "LoRA adapters and task head"
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))
        if p.requires_grad:
            params.append(p)
    return params, note


def default_lora_targets(model: Any) -> str | None:
    """None where peft knows the model type's modules; else peft's `all-linear` (every Linear but the
    output head), for model types peft has no list for (Phi-3's fused qkv_proj / gate_up_proj, say)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    return None if getattr(model.config, "model_type", None) in KNOWN else "all-linear"


def _wrap_lora(model: Any, task: str, config: FinetuneConfig) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    from compressor.tasks import task_for

    lora = LoraConfig(task_type=TaskType[task_for(task).peft_task_type],
                      r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules or default_lora_targets(model))
    return get_peft_model(model, lora)


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `finetune` step."""
    register(Finetune)
