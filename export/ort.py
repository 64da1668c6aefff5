"""`export-ort` (`onnx` → `ort`): ONNX Runtime's mobile format, converted with onnxruntime's own tool,
with the reduced-operator config for a minimal onnxruntime build written beside it; the result
must load and match the ONNX model's outputs on real rows."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from compressor.models.artifact import Artifact, copy_companions
from compressor.models.formats import Format
from compressor.errors import StepError
from compressor.hookspecs import hookimpl
from compressor.step import Step, StepConfig, StepContext


class ExportOrtConfig(StepConfig):
    """Settings of `export-ort`."""

    optimization: Literal["fixed", "runtime"] = Field(
        default="fixed", description="fixed: optimisations applied now, for the device's exact onnxruntime; "
                                     "runtime: saved so the device can apply them.")
    atol: float = Field(default=1e-4, gt=0, le=10, description="Largest allowed |logit difference| from the ONNX "
                                                              "model on real rows.")
    parity_rows: int = Field(default=32, ge=1, le=10_000, description="Real rows used by the parity check.")


def convert_to_ort(model_file: Path, out_dir: Path, optimization: str = "fixed") -> Path:
    """Convert one .onnx file with onnxruntime's converter; returns the .ort file (config written beside it)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    work = out_dir / ".ort-convert"
    work.mkdir()
    shutil.copy2(model_file, work / "model.onnx")
    style = OptimizationStyle.Fixed if optimization == "fixed" else OptimizationStyle.Runtime
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        convert_onnx_models_to_ort(work, output_dir=work, optimization_styles=[style])
    produced = sorted(work.glob("*.ort"))
    if not produced:
        raise StepError("onnxruntime's converter wrote no .ort file")
    shutil.move(str(produced[0]), out_dir / "model.ort")
    for config in work.glob("*.config"):
        shutil.move(str(config), out_dir / "required_operators.config")
    shutil.rmtree(work)
    return out_dir / "model.ort"


def to_ort(artifact: Artifact, out_dir: Path, style: str = "fixed", **info: object) -> Artifact:
    """The onnx artifact converted into out_dir as an `ort` artifact (config and tokenizer copied along);
    `style` is the converter's optimization style, `info` goes into the new artifact's metadata."""
    copy_companions(artifact, out_dir)
    convert_to_ort(artifact.model_file, out_dir, style)
    return artifact.derive(out_dir, format="ort", **info)


def bundle_copy(artifact: Artifact, out_dir: Path) -> Artifact:
    """An `onnx` artifact as the `ort` artifact a bundle in this format holds (its metadata kept)."""
    return to_ort(artifact, out_dir, **artifact.info.to_dict())


class ExportOrt(Step):
    """Convert to ONNX Runtime's mobile (.ort) format."""

    name = "export-ort"
    summary = "Convert to ONNX Runtime's mobile format (.ort) with a reduced-operator config; checked against ONNX."
    version = "1"
    Config = ExportOrtConfig
    accepts = ("onnx",)
    produces = "ort"

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Convert, copy tokenizer and config, and check logits against the ONNX model."""
        assert isinstance(config, ExportOrtConfig)
        from compressor.export.onnx import check_parity

        try:
            out = to_ort(artifact, ctx.out_dir, config.optimization, optimization=config.optimization,
                         opset=artifact.info.opset, quantized=artifact.info.quantized)
        except StepError:
            raise
        except Exception as exc:
            raise StepError(f"conversion to .ort failed: {type(exc).__name__}: {exc}") from exc
        ctx.report(operators_config="required_operators.config")
        check_parity(artifact, out, ctx, config.atol, config.parity_rows, ".ort logits differ from ONNX",
                     hint="raise with.atol if this difference is acceptable, or try optimization: runtime")
        return out


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `export-ort` step."""
    register(ExportOrt)


@hookimpl
def register_formats(register: Callable[[Format], None]) -> None:
    """`ort`: ONNX Runtime's mobile format; a bundle in it is converted from the final `onnx` model."""
    register(Format("ort", "ONNX Runtime's mobile format (.ort), run by ONNX Runtime", model_file="model.ort",
                    onnxruntime=True, from_onnx=bundle_copy))
