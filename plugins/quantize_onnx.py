"""`quantize-onnx`: int8 quantization of an ONNX model with onnxruntime's quantizer (`onnx` → `onnx`)."""

from __future__ import annotations

import shutil
from typing import Callable, Literal

from pydantic import Field

from compressor.artifact import Artifact
from compressor.errors import StepError
from compressor.hookspecs import hookimpl
from compressor.step import Step, StepConfig, StepContext


class QuantizeOnnxConfig(StepConfig):
    """Settings of `quantize-onnx`."""

    mode: Literal["dynamic"] = Field(default="dynamic", description="dynamic: int8 weights, activations "
                                                                     "quantized on the fly at run time.")
    per_channel: bool = Field(default=False, description="One scale per output channel of each weight.")
    reduce_range: bool = Field(default=False, description="7-bit weights, for CPUs without VNNI that saturate.")
    weight_type: Literal["int8", "uint8"] = Field(default="int8", description="Storage type of the weights.")
    op_types: list[str] | None = Field(default=None, description="Operator types to quantize "
                                                                  "(default: every type the quantizer supports).")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names to leave in float.")


class QuantizeOnnx(Step):
    """Dynamic int8 quantization with onnxruntime.quantization."""

    name = "quantize-onnx"
    summary = "Quantize an ONNX model to int8 with onnxruntime's quantizer (dynamic)."
    version = "1"
    Config = QuantizeOnnxConfig
    accepts = ("onnx",)
    produces = "onnx"

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Write the quantized model.onnx and copy the config and tokenizer beside it."""
        assert isinstance(config, QuantizeOnnxConfig)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for file in artifact.path.iterdir():
            if file.is_file() and file.suffix != ".onnx" and file.name != "artifact.json":
                shutil.copy2(file, ctx.out_dir / file.name)
        target = ctx.out_dir / "model.onnx"
        try:
            quantize_dynamic(str(artifact.model_file), str(target), per_channel=config.per_channel,
                             reduce_range=config.reduce_range, op_types_to_quantize=config.op_types,
                             nodes_to_exclude=config.exclude_nodes,
                             weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8)
        except Exception as exc:
            raise StepError(f"quantization failed: {type(exc).__name__}: {exc}",
                            hint="run with --debug for the quantizer's traceback") from exc
        return artifact.derive(ctx.out_dir, format="onnx", quantized="int8-dynamic",
                               per_channel=config.per_channel, **{k: v for k, v in artifact.info.items()
                                                                  if k in ("opset",)})


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `quantize-onnx` step."""
    register(QuantizeOnnx)
