"""Helpers for steps that change a transformers model: load it, save it beside its tokenizer,
and describe it (parameters, MACs)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compressor.models.artifact import TOKENIZER_FILES, Artifact
from compressor.errors import StepError


def load_model(artifact: Artifact) -> Any:
    """The artifact's transformers model with its task head, from safetensors, in eval mode.

    An unmerged LoRA adapter (finetune with merge: false) is merged in, so that the step sees
    the weights the artifact stands for.
    """
    from compressor.models.loading import load_torch_model

    try:
        model = load_torch_model(artifact.path, artifact.task, artifact.info.adapter)
    except (OSError, ValueError, RuntimeError) as exc:
        raise StepError(f"cannot load the model in {artifact.path}: {exc}") from None
    if artifact.info.adapter:
        model = model.merge_and_unload(safe_merge=True)
    return model


def onnx_opset(model: Any, default: int | None = None) -> int | None:
    """The version of the default (ai.onnx) domain a ModelProto imports, or `default`."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of a model directory."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def save_model(model: Any, src: Artifact, out_dir: Path, **info: Any) -> Artifact:
    """save_pretrained (safetensors) into out_dir with the source's tokenizer; returns the new artifact."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    copy_tokenizer(src.path, out_dir)
    return src.derive(out_dir, **info)


def example_inputs(model: Any, task: str, batch: int = 2, length: int = 16) -> dict[str, Any]:
    """Deterministic dummy inputs for tracing and MAC counting: the task's inputs that this model's
    forward takes (LLaMA and DistilBERT take no token_type_ids)."""
    import inspect

    import torch

    from compressor.tasks import task_for

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, model.config.vocab_size), (batch, length), generator=generator)
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    accepted = inspect.signature(model.forward).parameters
    return {k: values[k] for k in task_for(task).model_inputs if k in values and k in accepted}


def count_macs_and_params(model: Any, task: str, length: int = 128) -> tuple[int, int]:
    """(MACs for one sequence of `length` tokens, parameters), with torch-pruning's counter."""
    import contextlib
    import io

    import torch
    import torch_pruning as tp

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(model, example_inputs(model, task, 1, length))
    return int(macs), int(params)
