"""`optimize-onnx` (`onnx` → `onnx`): onnxruntime's offline transformer optimizer. It fuses each
layer's attention subgraph (Q/K/V MatMuls, reshapes, transposes, mask arithmetic, softmax) into one
`Attention` op, residual Add + LayerNorm into `SkipLayerNormalization` and bias + GELU into
`BiasGelu`, then checks the logits against the unfused model.

Put it between export-onnx and quantize-onnx: dynamic quantization turns `Attention` into
`QAttention`. The result uses onnxruntime contrib ops, so it is for onnxruntime targets
(CPU, GPU, the mobile format), not TensorRT.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Callable

from pydantic import Field

from compressor.models.artifact import Artifact, copy_companions
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.step import PlanContext, Step, StepConfig, StepContext

#: Hugging Face model types whose exported graphs onnxruntime's `bert` fusions understand.
#: (DistilBERT, RoBERTa and XLM-R are tested on tiny configs; others may fuse with `model_type: bert` set by hand.)
BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra", "ernie")
#: The fused operators counted in the step's report.
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
             "FastGelu", "Gelu", "LayerNormalization")


class OptimizeOnnxConfig(StepConfig):
    """Settings of `optimize-onnx`."""

    model_type: str = Field(default="auto", description="onnxruntime optimizer model type (bert, bart, gpt2, vit, "
                                                        "...). auto: bert for BERT-family encoders.")
    attention: bool = Field(default=True, description="Fuse each self-attention subgraph into one Attention op.")
    skip_layer_norm: bool = Field(default=True, description="Fuse residual Add + LayerNorm (SkipLayerNormalization).")
    bias_gelu: bool = Field(default=True, description="Fuse bias Add + GELU (BiasGelu).")
    embed_layer_norm: bool = Field(default=False, description="Fuse the embedding lookups and their LayerNorm "
                                                              "(EmbedLayerNormalization). Off by default: it measured "
                                                              "no faster, and int4 embedding tables (quantize-onnx "
                                                              "int4 with op_types [Gather]) need the plain lookups.")
    atol: float = Field(default=1e-3, gt=0, le=10, description="Largest allowed |logit difference| between the "
                                                               "fused and the unfused model.")
    parity_rows: int = Field(default=32, ge=1, le=10_000, description="Real rows used by the parity check.")


def optimizer_model_type(config: OptimizeOnnxConfig, hf_model_type: Any) -> str:
    """The onnxruntime optimizer's model type for this recipe: the configured one, or derived from config.json."""
    if config.model_type != "auto":
        return config.model_type
    if hf_model_type in BERT_FAMILY:
        return "bert"
    raise RecipeError(f"cannot tell which fusions fit model_type {hf_model_type!r}", where="with.model_type",
                      hint="set model_type to one of onnxruntime's optimizer model types (bert, bart, gpt2, vit, ...)")


def attention_shape(model_config: dict[str, Any]) -> tuple[int, int]:
    """(attention heads, hidden size) from a config.json, under the names the common architectures use."""
    heads = next((model_config[k] for k in ("num_attention_heads", "n_head", "encoder_attention_heads")
                  if isinstance(model_config.get(k), int)), 0)
    hidden = next((model_config[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(model_config.get(k), int)), 0)
    return heads, hidden


class OptimizeOnnx(Step):
    """Fuse attention, LayerNorm and GELU subgraphs with onnxruntime's transformer optimizer."""

    name = "optimize-onnx"
    summary = "Fuse attention, LayerNorm and GELU subgraphs (onnxruntime transformer optimizer), parity-checked."
    version = "1"
    Config = OptimizeOnnxConfig
    accepts = ("onnx",)
    produces = "onnx"

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """The step must follow export-onnx on a float graph, and the model type must map to known fusions."""
        assert isinstance(config, OptimizeOnnxConfig)
        changed = ctx.after("quantize-onnx", "convert-fp16")
        if changed:
            raise RecipeError(f"comes after {changed}: the fusions match float32 graphs", where="uses",
                              hint="put optimize-onnx right after export-onnx")
        fused = ctx.after("optimize-onnx")
        if fused:
            raise RecipeError(f"{fused} already fused this graph", where="uses", hint="keep one optimize-onnx step")
        model_type = optimizer_model_type(config, ctx.model_config.get("model_type"))
        if model_type == "bert":
            return  # what auto picks; importing the optimizer to list its types costs check 0.4 s
        from onnxruntime.transformers.optimizer import MODEL_TYPES

        if model_type not in MODEL_TYPES:
            raise RecipeError(f"unknown model_type {model_type!r}", where="with.model_type",
                              hint=f"use one of {', '.join(sorted(MODEL_TYPES))}")

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Write the fused model.onnx, report what was fused, and check the logits."""
        assert isinstance(config, OptimizeOnnxConfig)
        import onnx
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        from compressor.export.onnx import check_parity

        if artifact.info.quantized or artifact.info.precision == "fp16":
            raise StepError("the model is already quantized or fp16; the fusions match float graphs",
                            hint="put optimize-onnx right after export-onnx")
        model_config = json.loads((artifact.path / "config.json").read_text())
        model_type = optimizer_model_type(config, model_config.get("model_type"))
        options = FusionOptions(model_type)
        options.enable_attention = config.attention
        options.enable_skip_layer_norm = config.skip_layer_norm
        options.enable_bias_skip_layer_norm = config.skip_layer_norm
        options.enable_bias_gelu = config.bias_gelu
        options.enable_embed_layer_norm = config.embed_layer_norm
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        before = Counter(n.op_type for n in onnx.load(str(artifact.model_file), load_external_data=False).graph.node)
        try:
            # bert: num_heads/hidden_size 0 reads them from the graph, which also covers pruned heads and
            # widths; the other optimizers need them from config.json.
            # opt_level 0: only the portable fusions; onnxruntime applies its hardware-specific ones at load.
            heads, hidden = (0, 0) if model_type == "bert" else attention_shape(model_config)
            optimized = optimize_model(str(artifact.model_file), model_type=model_type, num_heads=heads,
                                       hidden_size=hidden, optimization_options=options, opt_level=0, use_gpu=False)
        except Exception as exc:
            raise StepError(f"the transformer optimizer failed: {type(exc).__name__}: {exc}",
                            hint="turn off the fusion it names (with.attention, ...) or drop optimize-onnx") from exc
        copy_companions(artifact, ctx.out_dir)
        optimized.save_model_to_file(str(ctx.out_dir / "model.onnx"), use_external_data_format=False)
        after = Counter(n.op_type for n in optimized.model.graph.node)
        fused = {op: after[op] for op in FUSED_OPS if after[op] > before[op]}
        out = artifact.derive(ctx.out_dir, format="onnx", fused=fused,
                              opset=artifact.info.opset)
        ctx.report(model_type=model_type, fused=fused, nodes_before=sum(before.values()),
                   nodes_after=sum(after.values()))
        if config.attention and not fused.get("Attention") and not fused.get("MultiHeadAttention"):
            raise StepError("no attention subgraph was fused: the graph does not match the optimizer's patterns",
                            hint="set with.attention: false to keep the other fusions, or drop optimize-onnx")
        check_parity(artifact, out, ctx, config.atol, config.parity_rows, "the fused model's logits differ",
                     hint="raise with.atol if this difference is acceptable, or turn a fusion off")
        return out


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `optimize-onnx` step."""
    register(OptimizeOnnx)
