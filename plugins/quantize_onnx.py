"""`quantize-onnx`: int8 quantization of an ONNX model with onnxruntime's quantizer (`onnx` → `onnx`)."""

from __future__ import annotations

import logging
import shutil
from typing import Callable, Literal

from pydantic import Field

from compressor.artifact import Artifact
from compressor.errors import StepError
from compressor.hookspecs import hookimpl
from compressor.step import Step, StepConfig, StepContext

VNNI_FLAGS = ("avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8")


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (int8 dot products without the AVX2 saturation issue)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return True  # not Linux x86: keep onnxruntime's default (int8)
    return any(f" {flag}" in flags for flag in VNNI_FLAGS) or "avx2" not in flags


def resolve_weight_type(setting: str) -> str:
    """`auto` → uint8 without VNNI, int8 with it."""
    if setting != "auto":
        return setting
    return "int8" if cpu_has_vnni() else "uint8"


class QuantizeOnnxConfig(StepConfig):
    """Settings of `quantize-onnx`."""

    mode: Literal["dynamic"] = Field(default="dynamic", description="dynamic: int8 weights, activations "
                                                                     "quantized on the fly at run time.")
    per_channel: bool = Field(default=False, description="One scale per output channel of each weight.")
    reduce_range: bool = Field(default=False, description="7-bit weights, for CPUs without VNNI that saturate.")
    weight_type: Literal["auto", "int8", "uint8"] = Field(
        default="auto", description="Storage type of the weights. auto: uint8 on x86 CPUs without VNNI, where "
                                    "int8 weights can saturate (onnxruntime's U8S8 caveat), else int8.")
    op_types: list[str] | None = Field(default=None, description="Operator types to quantize "
                                                                  "(default: every type the quantizer supports).")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names to leave in float.")


class QuantizeOnnx(Step):
    """Dynamic int8 quantization with onnxruntime.quantization."""

    name = "quantize-onnx"
    summary = "Quantize an ONNX model to int8 with onnxruntime's quantizer (dynamic)."
    version = "2"
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
        weight_type = resolve_weight_type(config.weight_type)
        ctx.report(weight_type=weight_type)
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns on the root logger about pre-processing
        try:
            quantize_dynamic(str(artifact.model_file), str(target), per_channel=config.per_channel,
                             reduce_range=config.reduce_range, op_types_to_quantize=config.op_types,
                             nodes_to_exclude=config.exclude_nodes,
                             weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8)
        except Exception as exc:
            raise StepError(f"quantization failed: {type(exc).__name__}: {exc}",
                            hint="run with --debug for the quantizer's traceback") from exc
        return artifact.derive(ctx.out_dir, format="onnx", quantized=f"{weight_type}-dynamic",
                               per_channel=config.per_channel, **{k: v for k, v in artifact.info.items()
                                                                  if k in ("opset",)})


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `quantize-onnx` step."""
    register(QuantizeOnnx)
