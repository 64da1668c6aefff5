"""`export-onnx`: `hf` → `onnx` with the optimum-onnx exporter, then a parity check against PyTorch."""

from __future__ import annotations

import logging
from typing import Any, Callable

from pydantic import Field

from compressor.artifact import Artifact
from compressor.errors import StepError
from compressor.hookspecs import hookimpl
from compressor.models import copy_tokenizer
from compressor.step import Step, StepConfig, StepContext

#: Used for the parity check when the recipe has no data.
FALLBACK_TEXTS = ["a gripping , beautifully made film .", "the plot is thin and the jokes fall flat .",
                  "EU rejects German call to boycott British lamb .", "Peter Blackburn reports from Brussels ."]


class ExportOnnxConfig(StepConfig):
    """Settings of `export-onnx`."""

    opset: int = Field(default=17, ge=11, le=23, description="ONNX opset version.")
    atol: float = Field(default=1e-4, gt=0, le=10, description="Largest allowed |logit difference| between "
                                                              "PyTorch and ONNX Runtime in the parity check.")
    parity_rows: int = Field(default=32, ge=1, le=10_000, description="Real rows used by the parity check.")


def parity_texts(ctx: StepContext, n: int) -> list[Any]:
    """Real rows for parity checks: eval data, else train data, else a few built-in sentences."""
    for split in ("eval", "train"):
        if ctx.data is not None and ctx.data.has(split):
            return [r.text for r in ctx.data.load(split)[:n]]
    return FALLBACK_TEXTS[:n]


def check_parity(reference: Artifact, candidate: Artifact, ctx: StepContext, atol: float, rows: int, what: str,
                 hint: str) -> None:
    """The task's parity check on real rows (for a classifier: the largest |logit difference|; for a generator
    also its greedy tokens); raise StepError when the difference exceeds `atol` or the task finds a problem."""
    from compressor.tasks import task_for

    result = task_for(reference.task).parity(reference, candidate, parity_texts(ctx, rows), ctx.threads)
    diff = result["max_abs_diff"]
    ctx.report(parity_max_abs_diff=diff, parity_atol=atol,
               **{f"parity_{k}": v for k, v in result.items() if k not in ("max_abs_diff", "problem")})
    if diff > atol:
        raise StepError(f"parity check failed: {what} by {diff:.3g} (atol {atol})", hint=hint)
    if result.get("problem"):
        raise StepError(f"parity check failed: {result['problem']}", hint=hint)


class ExportOnnx(Step):
    """Export a transformers model to ONNX (optimum-onnx) and check its logits against PyTorch."""

    name = "export-onnx"
    summary = "Export to ONNX with optimum-onnx, then check logits against PyTorch on real rows."
    version = "1"
    Config = ExportOnnxConfig
    accepts = ("hf",)
    produces = "onnx"

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Export into ctx.out_dir and raise StepError if the parity check fails."""
        assert isinstance(config, ExportOnnxConfig)
        from optimum.exporters.onnx import main_export

        logging.getLogger("optimum").setLevel(logging.ERROR)
        if artifact.info.get("quantized"):
            raise StepError(f"the model is quantized ({artifact.info['quantized']}); export the float model",
                            hint="put quantize-torch last, or quantize after export with quantize-onnx")
        if artifact.info.get("adapter"):
            raise StepError("the model carries an unmerged LoRA adapter",
                            hint="set merge: true on finetune, or add a merge-adapter step before export-onnx")
        from compressor.evaluators.runtime import load_plugin_model

        # a model in a plugin's own layout (say, low-rank Linears) cannot be re-read by optimum from
        # its directory, so it is exported from the module the plugin's loader rebuilt
        custom = load_plugin_model(artifact.path, artifact.task)
        from compressor.tasks import task_for

        export_task = task_for(artifact.task).export_task
        try:
            if custom is None:
                main_export(str(artifact.path), output=str(ctx.out_dir), task=export_task, opset=config.opset,
                            do_validation=False, local_files_only=True, library_name="transformers")
            else:
                from optimum.exporters.onnx import onnx_export_from_model

                onnx_export_from_model(custom.eval(), output=str(ctx.out_dir), task=export_task,
                                       opset=config.opset, do_validation=False)
                copy_tokenizer(artifact.path, ctx.out_dir)
        except Exception as exc:  # the exporter raises many kinds; all mean the same to the user
            raise StepError(f"ONNX export failed: {type(exc).__name__}: {exc}",
                            hint="try another opset, or run with --debug for the exporter's traceback") from exc
        out = artifact.derive(ctx.out_dir, format="onnx", opset=config.opset)
        check_parity(artifact, out, ctx, config.atol, config.parity_rows, "ONNX logits differ from PyTorch",
                     hint="raise with.atol if this difference is acceptable, or try another opset")
        return out


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `export-onnx` step."""
    register(ExportOnnx)
