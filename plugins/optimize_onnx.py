"""`optimize-onnx` (`onnx` → `onnx`): onnxruntime's offline transformer optimizer. It fuses each
layer's attention subgraph (Q/K/V MatMuls, reshapes, transposes, mask arithmetic, softmax) into one
`Attention` op, residual Add + LayerNorm into `SkipLayerNormalization` and bias + GELU into
`BiasGelu`, then checks the logits against the unfused model. With `skip_layer_norm: auto` it times the
residual Add + LayerNorm both ways at batch 1 on the CPU it runs on and keeps the faster; an unfused graph
records `disabled_optimizers` so that the evaluator and the bundle load it without onnxruntime's own
SkipLayerNormFusion, which would otherwise fuse it again.

Put it between export-onnx and quantize-onnx: dynamic quantization turns `Attention` into
`QAttention`. The result uses onnxruntime contrib ops, so it is for onnxruntime targets
(CPU, GPU, the mobile format), not TensorRT.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal

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
#: The onnxruntime optimizer that would fuse an unfused residual Add + LayerNorm again when a session loads it.
SKIP_LAYER_NORM_FUSION = "SkipLayerNormFusion"
#: skip_layer_norm auto keeps the unfused form when its batch-1 time is at most this share of the fused one's.
UNFUSED_NEEDS = 0.95
#: skip_layer_norm auto: interleaved timing rounds, and calls per form and round.
TIMING_ROUNDS, TIMING_CALLS = 7, 40


class OptimizeOnnxConfig(StepConfig):
    """Settings of `optimize-onnx`."""

    model_type: str = Field(default="auto", description="onnxruntime optimizer model type (bert, bart, gpt2, vit, "
                                                        "...). auto: bert for BERT-family encoders.")
    attention: bool = Field(default=True, description="Fuse each self-attention subgraph into one Attention op.")
    skip_layer_norm: bool | Literal["auto"] = Field(
        default=True, description="Fuse residual Add + LayerNorm (SkipLayerNormalization). false: keep them apart, "
                                  "in the file and in every session that loads it (onnxruntime's "
                                  "SkipLayerNormFusion is left off at load, by the evaluator and the bundle). "
                                  "auto: time both forms at batch 1 on this CPU, interleaved on real rows (tuning "
                                  "rows, else train rows), and keep the unfused one if it is at least 5% faster.")
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


def fuse_graph(artifact: Artifact, config: OptimizeOnnxConfig, model_type: str, model_config: dict[str, Any],
               skip_layer_norm: bool) -> Any:
    """onnxruntime's transformer optimizer on the artifact's graph, with the recipe's fusions."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_attention = config.attention
    options.enable_skip_layer_norm = skip_layer_norm
    options.enable_bias_skip_layer_norm = skip_layer_norm
    options.enable_bias_gelu = config.bias_gelu
    options.enable_embed_layer_norm = config.embed_layer_norm
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        # bert: num_heads/hidden_size 0 reads them from the graph, which also covers pruned heads and
        # widths; the other optimizers need them from config.json.
        # opt_level 0: only the portable fusions; onnxruntime applies its hardware-specific ones at load.
        heads, hidden = (0, 0) if model_type == "bert" else attention_shape(model_config)
        return optimize_model(str(artifact.model_file), model_type=model_type, num_heads=heads, hidden_size=hidden,
                              optimization_options=options, opt_level=0, use_gpu=False)
    except Exception as exc:
        raise StepError(f"the transformer optimizer failed: {type(exc).__name__}: {exc}",
                        hint="turn off the fusion it names (with.attention, ...) or drop optimize-onnx") from exc


def write_form(artifact: Artifact, optimized: Any, folder: Path, before: Counter,
               skip_layer_norm: bool) -> tuple[Artifact, int]:
    """Save one optimized graph with the artifact's companions into `folder`: (the artifact there, its node
    count). Without skip_layer_norm, sessions load it without SkipLayerNormFusion."""
    folder.mkdir(parents=True)
    optimized.save_model_to_file(str(folder / "model.onnx"), use_external_data_format=False)
    copy_companions(artifact, folder)
    after = Counter(n.op_type for n in optimized.model.graph.node)
    fused = {op: after[op] for op in FUSED_OPS if after[op] > before[op]}
    unfused = {} if skip_layer_norm else {"disabled_optimizers": [SKIP_LAYER_NORM_FUSION]}
    return (artifact.derive(folder, format="onnx", fused=fused, opset=artifact.info.opset, **unfused),
            sum(after.values()))


def choose_residual_form(fused: Artifact, unfused: Artifact, ctx: StepContext) -> bool:
    """skip_layer_norm auto: True to keep SkipLayerNormalization, False for the unfused residual path, by the
    median over interleaved rounds of the unfused form's batch-1 time over the fused one's."""
    from compressor.export.onnx import parity_texts
    from compressor.models.data import TUNE
    from compressor.models.loading import load_runner

    runners = {True: load_runner(fused, ctx.threads), False: load_runner(unfused, ctx.threads)}
    # tuning rows, else train rows: never the eval rows a figure is quoted from
    feeds = [runners[True].encode([text]) for text in parity_texts(ctx, 64, (TUNE, "train"))]
    rounds: dict[bool, list[float]] = {True: [], False: []}
    for r in range(TIMING_ROUNDS):
        for form in ((True, False) if r % 2 == 0 else (False, True)):
            for feed in feeds[:10]:
                runners[form](feed)
            times = []
            for i in range(TIMING_CALLS):
                t0 = time.perf_counter()
                runners[form](feeds[(r * TIMING_CALLS + i) % len(feeds)])
                times.append(time.perf_counter() - t0)
            rounds[form].append(statistics.median(times) * 1e3)
    ratio = statistics.median(u / f for u, f in zip(rounds[False], rounds[True]))
    keep = ratio > UNFUSED_NEEDS
    ctx.report(skip_layer_norm="fused" if keep else "unfused", unfused_time_ratio=round(ratio, 3),
               batch1_ms={"fused": round(statistics.median(rounds[True]), 3),
                          "unfused": round(statistics.median(rounds[False]), 3)})
    return keep


class OptimizeOnnx(Step):
    """Fuse attention, LayerNorm and GELU subgraphs with onnxruntime's transformer optimizer."""

    name = "optimize-onnx"
    summary = "Fuse attention, LayerNorm and GELU subgraphs (onnxruntime transformer optimizer), parity-checked."
    version = "1"
    Config = OptimizeOnnxConfig
    accepts = ("onnx",)
    produces = "onnx"

    def cache_extra(self, config: StepConfig) -> Any:
        """skip_layer_norm auto measures on this CPU: its model and onnxruntime's version key the cache."""
        assert isinstance(config, OptimizeOnnxConfig)
        if config.skip_layer_norm != "auto":
            return super().cache_extra(config)
        from importlib.metadata import PackageNotFoundError, version

        from compressor.run.cpu import cpu_model

        try:
            runtime = version("onnxruntime")
        except PackageNotFoundError:
            runtime = version("onnxruntime-gpu")
        return {"cpu": cpu_model(), "onnxruntime": runtime}

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

        from compressor.export.onnx import check_parity

        if artifact.info.quantized or artifact.info.precision == "fp16":
            raise StepError("the model is already quantized or fp16; the fusions match float graphs",
                            hint="put optimize-onnx right after export-onnx")
        model_config = json.loads((artifact.path / "config.json").read_text())
        model_type = optimizer_model_type(config, model_config.get("model_type"))
        before = Counter(n.op_type for n in onnx.load(str(artifact.model_file), load_external_data=False).graph.node)
        copy_companions(artifact, ctx.out_dir)
        forms = [True, False] if config.skip_layer_norm == "auto" else [bool(config.skip_layer_norm)]
        with tempfile.TemporaryDirectory(prefix="optimize-onnx-") as work:
            built = {fuse: write_form(artifact, fuse_graph(artifact, config, model_type, model_config, fuse),
                                      Path(work) / str(fuse), before, fuse) for fuse in forms}
            keep = forms[0] if len(forms) == 1 else choose_residual_form(built[True][0], built[False][0], ctx)
            shutil.copy2(built[keep][0].model_file, ctx.out_dir / "model.onnx")
        chosen, nodes = built[keep]
        out = artifact.derive(ctx.out_dir, format="onnx", **chosen.info.to_dict())
        fused = out.info.fused or {}
        ctx.report(model_type=model_type, fused=fused, nodes_before=sum(before.values()), nodes_after=nodes)
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
