"""`convert-fp16` (`onnx` → `onnx`): float16 weights and compute for GPU targets, with the model's
inputs and outputs and the numerically fragile ops kept in float32 (onnxruntime's converter)."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field

from compressor.models.artifact import Artifact, copy_companions
from compressor.errors import StepError
from compressor.hookspecs import hookimpl
from compressor.step import Step, StepConfig, StepContext

#: Kept in float32: reductions and exponentials overflow or lose precision in fp16.
FP32_OPS = ["LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "Exp",
            "Range", "CumSum", "TopK", "NonMaxSuppression", "Resize", "Upsample"]


class ConvertFp16Config(StepConfig):
    """Settings of `convert-fp16`."""

    keep_io_types: bool = Field(default=True, description="Keep the model's inputs and outputs in float32.")
    op_block_list: list[str] = Field(default_factory=lambda: list(FP32_OPS),
                                     description="Operator types kept in float32.")


class ConvertFp16(Step):
    """Convert an ONNX model to float16 (for GPU execution providers)."""

    name = "convert-fp16"
    summary = "Convert an ONNX model to float16 for GPU targets, fragile ops and I/O kept in float32."
    version = "3"
    Config = ConvertFp16Config
    accepts = ("onnx",)
    produces = "onnx"

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Convert and write model.onnx beside the copied config and tokenizer."""
        assert isinstance(config, ConvertFp16Config)
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        if artifact.info.quantized:
            raise StepError(f"the model is quantized ({artifact.info.quantized}); fp16 converts float models",
                            hint="use convert-fp16 instead of, not after, quantize-onnx")
        copy_companions(artifact, ctx.out_dir)
        model = onnx.load(str(artifact.model_file))
        converted = convert_float_to_float16(model, keep_io_types=config.keep_io_types,
                                             op_block_list=config.op_block_list)
        repaired = drop_duplicate_nodes(converted.graph)
        onnx.save(converted, str(ctx.out_dir / "model.onnx"))
        ctx.report(repaired_duplicate_nodes=repaired)
        return artifact.derive(ctx.out_dir, format="onnx", precision="fp16",
                               opset=artifact.info.opset)


def drop_duplicate_nodes(graph: Any) -> int:
    """Remove nodes that repeat an earlier node exactly (same op, inputs, attributes and outputs) and give
    the rest unique names. onnxruntime's converter emits one Cast per fp32 consumer of a tensor, all with
    the same output name, which onnxruntime then refuses to load. Returns how many nodes changed."""
    defined: dict[str, Any] = {}
    keep, names, changed = [], set(), 0
    for node in graph.node:
        key = (node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))
        outputs = tuple(node.output)
        if outputs and all(o in defined for o in outputs) and all(defined[o] == key for o in outputs):
            changed += 1
            continue
        for o in outputs:
            defined[o] = key
        if node.name in names:
            n = 1
            while f"{node.name}_{n}" in names:
                n += 1
            node.name = f"{node.name}_{n}"
            changed += 1
        names.add(node.name)
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return changed


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `convert-fp16` step."""
    register(ConvertFp16)
