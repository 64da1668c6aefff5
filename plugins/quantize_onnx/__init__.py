"""`quantize-onnx` (`onnx` → `onnx`) with onnxruntime's quantizers:

- `auto`: dynamic int8 with the settings measured best on this CPU (`tune.py` beside this module);
- `dynamic`: int8 weights, activations quantized on the fly;
- `static`: QDQ int8 with activation ranges calibrated on the recipe's train rows (MinMax,
  Entropy or Percentile), leaving the numerically fragile transformer ops in float;
- `int4`: weight-only blockwise int4 of MatMul weights (MatMulNBits).
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field

from compressor.models.artifact import Artifact, copy_companions
from compressor.models.data import TUNE
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.models import onnx_opset
from compressor.step import PlanContext, Step, StepConfig, StepContext

#: Ops kept in float by static quantization: normalisation, activations and softmax lose accuracy in int8.
FRAGILE_OPS = ["LayerNormalization", "SkipLayerNormalization", "Gelu", "FastGelu", "BiasGelu", "Softmax", "Erf",
               "Tanh", "Pow", "Sqrt", "ReduceMean", "Div", "Sub", "Where", "Cast", "Expand"]


#: What static mode quantizes by default: the ops that hold the weights. Residual Adds, the attention-mask
#: arithmetic and the ops above stay float, which is what keeps transformer accuracy.
STATIC_OP_TYPES = ["MatMul", "Gather"]


class QuantizeOnnxConfig(StepConfig):
    """Settings of `quantize-onnx`."""

    mode: Literal["auto", "dynamic", "static", "int4"] = Field(
        default="dynamic", description="auto: dynamic int8 whose settings are chosen by measuring candidates on the "
                                       "tuning rows of this CPU (fastest first, within max_accuracy_drop); dynamic: "
                                       "int8 weights, activations quantized at run time; static: QDQ int8 calibrated "
                                       "on train rows; int4: weight-only blockwise int4 MatMuls.")
    per_channel: bool = Field(default=False, description="One scale per output channel (dynamic, static).")
    reduce_range: bool = Field(default=False, description="7-bit weights (dynamic, static): avoids the 16-bit "
                                                          "saturation of x86 int8 kernels without VNNI, at a cost in "
                                                          "precision. mode: auto measures whether it helps.")
    weight_type: Literal["int8", "uint8"] = Field(
        default="int8", description="dynamic: storage type of the weights. int8 runs the fastest kernels, but on x86 "
                                    "CPUs without VNNI they saturate (onnxruntime's U8S8 caveat); mode: auto "
                                    "measures which to use.")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1000, description="auto: largest allowed drop of the task metric on the tuning rows, "
                                                 "against this step's input, in the metric's units. Default: the recipe's "
                                              "guard.max_accuracy_drop.")
    relative_drop: bool = Field(default=False, description="auto: read max_accuracy_drop as a fraction of the "
                                                           "input's metric (default: the guard's `relative`).")
    tuning_rows: int = Field(default=5000, ge=16, le=1_000_000, description="auto: at most this many tuning rows "
                                                                            "(a seeded sample of data.validation or "
                                                                            "of the held-out train rows). Fewer rows, "
                                                                            "more noise: on SST-2, 1,000 rows leave "
                                                                            "about ±0.4 points on a measured drop.")
    max_excluded: int = Field(default=4, ge=0, le=64, description="auto: at most this many of the most sensitive "
                                                                  "nodes (measured) left in float, as a last resort.")
    op_types: list[str] | None = Field(default=None, description="Operator types to quantize (default: dynamic — "
                                                                  "all it supports; static — MatMul and Gather, the "
                                                                  "weight-heavy ops; int4 — MatMul, and Gather "
                                                                  "(embeddings, as GatherBlockQuantized) if listed). "
                                                                  "After optimize-onnx, list Attention too "
                                                                  "(→ QAttention) when naming op types.")
    exclude_op_types: list[str] = Field(default_factory=lambda: list(FRAGILE_OPS),
                                        description="static: operator types always left in float, even if listed "
                                                    "in op_types (LayerNorm, GELU, Softmax and the like).")
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names left in float.")
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax", description="static: how activation ranges are chosen.")
    calibration_rows: int | None = Field(default=None, ge=0, le=100_000, description="static: train rows used to "
                                                                                     "calibrate (default 128); int4 "
                                                                                     "gptq: train rows rendered as "
                                                                                     "finetune renders them (default "
                                                                                     "128, or 0 with calibration_text).")
    calibration_text: str | None = Field(default=None, description="int4 gptq: a plain-text file (relative to the "
                                                                   "recipe) to calibrate on as well as (or, by "
                                                                   "default, instead of) train rows: a seeded sample "
                                                                   "of calibration_windows windows of "
                                                                   "calibration_window tokens.")
    calibration_windows: int = Field(default=8, ge=1, le=100_000, description="int4 gptq: calibration_text "
                                                                              "windows.")
    calibration_window: int = Field(default=512, ge=16, le=32_768, description="int4 gptq: tokens per "
                                                                               "calibration_text window.")
    block_size: int = Field(default=32, ge=16, le=1024, description="int4: weights per quantization block "
                                                                    "(a power of two dividing the layer widths).")
    int8_block_size: int | None = Field(default=None, ge=16, le=1024, description="int4: weights per block of the "
                                                                                 "int8_nodes (default block_size): "
                                                                                 "8-bit codes need fewer scales.")
    symmetric: bool = Field(default=True, description="int4: symmetric blocks (no zero points).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(default=4, description="int4: MatMulNBits compute precision "
                                                                          "(4 = int8 activations, fastest on CPU).")
    algorithm: Literal["minmax", "rtn", "k_quant", "hqq", "gptq"] = Field(
        default="minmax", description="int4: how MatMul blocks are fitted: onnxruntime's weight-only quantizers "
                                      "minmax (each block's range), rtn (round to nearest), k_quant (llama.cpp-style "
                                      "k-quants), hqq (half-quadratic, asymmetric); or gptq (each block's min-max "
                                      "grid, rounding errors compensated through the Hessian of the MatMul's "
                                      "input on calibration_rows train rows; language models). Gather tables "
                                      "always use minmax.")
    clip_search: bool = Field(default=False, description="int4 gptq: shrink each block's range (to as little as "
                                                         "80%) where that lowers its rounding error, weighted by "
                                                         "the Hessian's diagonal, instead of keeping min-max.")
    refit_scales: bool = Field(default=False, description="int4 gptq: once a MatMul's codes are fixed, solve for "
                                                          "its block scales again, all of a row's blocks together, "
                                                          "for the least output error on the calibration text.")
    awq: bool = Field(default=False, description="int4 gptq: before GPTQ, scale the weights of the MatMuls that "
                                                 "read an RMSNorm by their input channels' activation size on the "
                                                 "calibration text (AWQ), folding the inverse into the norm, with "
                                                 "the exponent that leaves the least output error.")
    int8_nodes: list[str] = Field(default_factory=list, description="int4: MatMuls (regular expressions searched in "
                                                                    "node names) kept at 8 bits (MatMulNBits bits=8, "
                                                                    "the same blocks): the sensitive few, say "
                                                                    "the attention's value and the MLP's down "
                                                                    "projections of the first and last layers.")


class QuantizeOnnx(Step):
    """int8 (dynamic or static QDQ) and int4 weight-only quantization with onnxruntime."""

    name = "quantize-onnx"
    summary = "Quantize an ONNX model: dynamic int8, static QDQ int8 (calibrated), or int4 weight-only."
    version = "12"  # 4: int4 embedding tables packed as uint8; 5: mode auto, dynamic weights int8 unless set;
    # 6: int4 packs a tied LM head (a MatMul reading a transposed table) and takes `algorithm`;
    # 7: a Gather reading a transposed table is untied too, and a tied head and table share one int4 copy;
    # 8: they share it when only rounding ties differ; 9: algorithm gptq (and a GPTQ head's table reads its codes);
    # 10: gptq clip_search; 11: gptq refit_scales; 12: gptq awq
    Config = QuantizeOnnxConfig
    accepts = ("onnx",)
    produces = "onnx"
    content_fields = ("calibration_text",)
    section_notes = ("search",)

    @classmethod
    def report_sections(cls, step: dict[str, Any]) -> list[str]:
        """mode auto: the settings search's candidates, the one chosen and why."""
        from compressor.plugins.quantize_onnx.report import search_markdown

        return search_markdown(step) if isinstance(step.get("notes", {}).get("search"), dict) else []

    @classmethod
    def bundle_facts(cls, notes: dict[str, Any]) -> dict[str, Any]:
        """mode auto: `tuned_on`, the CPU (and its int8 kernel class) the quantization was chosen on."""
        search = notes.get("search")
        return {"tuned_on": search.get("cpu")} if isinstance(search, dict) else {}

    def cache_extra(self, config: StepConfig) -> Any:
        """mode: auto measures on this CPU: its int8 kernel class and onnxruntime's version key the cache,
        so a cache shared between machines never hands one CPU's choice to another. GPTQ's calibration_text
        keys it by content (`content_fields`)."""
        assert isinstance(config, QuantizeOnnxConfig)
        texts = super().cache_extra(config)
        if texts or config.mode != "auto":
            return texts
        from importlib.metadata import version

        from compressor.run.cpu import int8_kernel_class

        return {"int8_kernels": int8_kernel_class(), "onnxruntime": version("onnxruntime")
                if _installed("onnxruntime") else version("onnxruntime-gpu")}

    def data_splits(self, config: StepConfig) -> tuple[str, ...]:
        """Static quantization and int4 GPTQ read train rows for calibration; auto reads the tuning rows."""
        assert isinstance(config, QuantizeOnnxConfig)
        if config.mode == "int4" and config.algorithm == "gptq":
            return ("train",) if gptq_train_rows(config) else ()
        return {"static": ("train",), "auto": (TUNE,)}.get(config.mode, ())

    def resolve_config(self, config: StepConfig, ctx: PlanContext) -> StepConfig:
        """mode: auto takes its budget from the recipe's guard unless it sets its own; calibration_text is
        resolved against the recipe's folder (so that its content keys the cache)."""
        assert isinstance(config, QuantizeOnnxConfig)
        if config.calibration_text is not None:
            config = config.model_copy(update={"calibration_text": str(ctx.resolve(config.calibration_text))})
        if config.mode == "auto" and config.max_accuracy_drop is None:
            return config.model_copy(update={"max_accuracy_drop": ctx.recipe.guard.max_accuracy_drop,
                                             "relative_drop": ctx.recipe.guard.relative})
        return config

    def supports(self, config: StepConfig, task: Any, model_config: dict[str, Any]) -> str | None:
        """Language models: weight-only int4 (their evaluator needs the recipe's perplexity settings, which
        the int8 modes' calibration and search do not read yet); GPTQ: language models only."""
        from compressor.export.onnx import DECODER_LAYOUT

        if task.export_task == DECODER_LAYOUT and getattr(config, "mode", None) != "int4":
            return f"mode {config.mode!r} is not built for {task.name} models yet; use mode: int4"
        if task.export_task != DECODER_LAYOUT and getattr(config, "algorithm", None) == "gptq" and config.mode == "int4":
            return (f"algorithm: gptq calibrates causal language models (text through the KV-cached graph), not "
                    f"{task.name} models; use algorithm: minmax")
        return None

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """mode: auto needs a budget; static QDQ cannot follow optimize-onnx; int4 block sizes must be powers of
        two that divide the model's widths, and int4 tables cannot follow an int8 step that took them."""
        assert isinstance(config, QuantizeOnnxConfig)
        if config.mode == "auto" and config.max_accuracy_drop is None and ctx.recipe.guard.max_accuracy_drop is None:
            raise RecipeError("mode: auto needs an accuracy budget to search within", where="with.max_accuracy_drop",
                              hint="set with.max_accuracy_drop, or guard.max_accuracy_drop for the whole recipe")
        fused = ctx.after("optimize-onnx")
        if config.mode == "static" and fused:
            raise RecipeError(f"static quantization cannot follow {fused}: onnxruntime's QDQ quantizer cannot type "
                              "the fused operators' outputs and would leave their activations float",
                              where="with.mode", hint="use mode: dynamic after optimize-onnx, or leave "
                                                      "optimize-onnx out of a static (QDQ) chain")
        if config.mode == "static" and config.calibration_rows == 0:
            raise RecipeError("static quantization needs at least one calibration row", where="with.calibration_rows",
                              hint="leave calibration_rows out (128) or give a positive number")
        if config.calibration_text is not None:
            if config.mode != "int4" or config.algorithm != "gptq":
                raise RecipeError("calibration_text is read by mode: int4 with algorithm: gptq only",
                                  where="with.calibration_text", hint="remove it, or set algorithm: gptq")
            if not ctx.resolve(config.calibration_text).is_file():
                raise RecipeError(f"{ctx.resolve(config.calibration_text)} does not exist",
                                  where="with.calibration_text", hint="fix the path (relative to the recipe file)")
        for option in ("clip_search", "refit_scales", "awq"):
            if getattr(config, option) and (config.mode != "int4" or config.algorithm != "gptq"):
                raise RecipeError(f"{option} is read by mode: int4 with algorithm: gptq only", where=f"with.{option}",
                                  hint="remove it, or set algorithm: gptq (onnxruntime's own int4 algorithms fit "
                                       "their own grids)")
        if config.mode != "int4":
            return
        rows = gptq_train_rows(config)
        if config.algorithm == "gptq" and rows and not (ctx.data and ctx.data.has("train")):
            raise RecipeError(f"algorithm: gptq calibrates on {rows} train rows, and the recipe gives no data.train",
                              where="with.calibration_rows",
                              hint="add data.train, or with.calibration_text (a plain-text file) and "
                                   "calibration_rows: 0")
        if config.algorithm == "gptq" and not rows and config.calibration_text is None:
            raise RecipeError("algorithm: gptq needs calibration text: calibration_rows is 0 and there is no "
                              "calibration_text", where="with.calibration_rows",
                              hint="give calibration_rows > 0 or with.calibration_text")
        tables = "Gather" in (config.op_types or ())
        for i, (uses, earlier) in enumerate(ctx.earlier):
            if (tables and uses == self.name and isinstance(earlier, QuantizeOnnxConfig) and earlier.mode != "int4"
                    and (earlier.op_types is None or "Gather" in earlier.op_types)):
                raise RecipeError(f"the embedding tables are already int8 after steps[{i}] ({uses}), which "
                                  "quantizes Gather", where="with.op_types",
                                  hint=f"give steps[{i}] op_types without Gather, e.g. [MatMul, Attention]")
        if config.int8_block_size is not None and not config.int8_nodes:
            raise RecipeError("int8_block_size is read for int8_nodes, and none are given", where="with.int8_block_size",
                              hint="remove it, or name the MatMuls to keep at 8 bits in int8_nodes")
        for field in ("block_size", "int8_block_size"):
            size = getattr(config, field)
            if size is None:
                continue
            if size & (size - 1):
                raise RecipeError(f"{field} {size} is not a power of two", where=f"with.{field}")
            for key in ("hidden_size", "intermediate_size"):
                width = ctx.model_config.get(key)
                if isinstance(width, int) and width % size:
                    raise RecipeError(f"{field} {size} does not divide the model's {key} {width}",
                                      where=f"with.{field}", hint="choose 16, 32, 64 or 128 dividing the widths")

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Write the quantized model.onnx and copy the config and tokenizer beside it."""
        assert isinstance(config, QuantizeOnnxConfig)
        copy_companions(artifact, ctx.out_dir)
        target = ctx.out_dir / "model.onnx"
        try:
            with quiet_root_logger():
                label = _quantize(artifact, target, config, ctx)
        except StepError:
            raise
        except Exception as exc:
            raise StepError(f"{config.mode} quantization failed: {type(exc).__name__}: {exc}",
                            hint="run with --debug for the quantizer's traceback") from exc
        return artifact.derive(ctx.out_dir, format="onnx", quantized=label,
                               opset=artifact.info.opset)


def _quantize(artifact: Artifact, target: Path, config: QuantizeOnnxConfig, ctx: StepContext) -> str:
    """Quantize by mode into `target`; returns the artifact's `quantized` label."""
    if config.mode == "auto":
        from compressor.plugins.quantize_onnx.tune import search

        ctx.report(search=search(artifact, config, ctx))
        return "int8-dynamic-tuned"
    if config.mode == "dynamic":
        return _dynamic(artifact.model_file, target, config, ctx)
    if config.mode == "static":
        return _static(artifact, target, config, ctx)
    sequences = None
    if config.algorithm == "gptq" and "MatMul" in (config.op_types or ("MatMul",)):
        sequences = calibration_sequences(artifact, ctx, config)
        ctx.report(calibration_tokens=sum(len(s) for s in sequences))
    return _int4(artifact.model_file, target, config, ctx, sequences)


def gptq_train_rows(config: QuantizeOnnxConfig) -> int:
    """Train rows GPTQ calibrates on: calibration_rows, by default 128 without calibration_text and 0 with it."""
    if config.calibration_rows is not None:
        return config.calibration_rows
    return 0 if config.calibration_text else 128


def calibration_window_starts(tokens: int, width: int, windows: int, seed: int) -> list[int]:
    """Token offsets of the calibration_text windows GPTQ reads: a seeded sample of the file's whole
    `width`-token windows (bench/perplexity_spread.py leaves them out of what it measures)."""
    import random

    starts = list(range(0, tokens - width + 1, width))
    return sorted(random.Random(seed).sample(starts, min(len(starts), windows)))


def calibration_sequences(artifact: Artifact, ctx: Any, config: QuantizeOnnxConfig) -> list[list[int]]:
    """GPTQ's calibration token ids: a seeded sample of calibration_windows windows of calibration_text, then
    seeded train rows rendered as finetune renders them for the task."""
    windows, rows = calibration_parts(artifact, ctx, config)
    return windows + rows


def calibration_parts(artifact: Artifact, ctx: Any, config: QuantizeOnnxConfig
                      ) -> tuple[list[list[int]], list[list[int]]]:
    """GPTQ's calibration token ids in two parts: the calibration_text windows and the train rows."""
    from compressor.models.loading import load_tokenizer
    from compressor.models.training import collate, sample_rows

    tokenizer = load_tokenizer(artifact.path)
    out: list[list[int]] = []
    if config.calibration_text is not None:
        ids = tokenizer(Path(config.calibration_text).read_text(encoding="utf-8"))["input_ids"]
        width = config.calibration_window
        if len(ids) < width:
            raise StepError(f"{config.calibration_text} has {len(ids)} tokens, fewer than one calibration_window "
                            f"({width})", hint="give a longer file or a smaller calibration_window")
        chosen = calibration_window_starts(len(ids), width, config.calibration_windows, ctx.seed)
        out += [list(ids[s : s + width]) for s in chosen]
    rows = gptq_train_rows(config)
    if rows:
        if ctx.data is None or not ctx.data.has("train"):
            raise StepError("int4 gptq needs train rows to calibrate on", hint="add data.train to the recipe, or "
                                                                              "with.calibration_text")
        return out, [collate(tokenizer, [row], artifact.task, {}, artifact.max_length)["input_ids"][0].tolist()
                     for row in sample_rows(ctx.data.load("train"), rows, ctx.seed)]
    return out, []


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizers warn through the root logger (about pre-processing), which would also give
    the root logger a handler for good: for the duration of the call only, the root logger gets a
    NullHandler and level ERROR; the caller's logging is restored afterwards."""
    root = logging.getLogger()
    level, handler = root.level, logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def _dynamic(source: Path, target: Path, config: QuantizeOnnxConfig, ctx: StepContext) -> str:
    from compressor.plugins.quantize_onnx.tune import Candidate, quantize_dynamic_file

    ctx.report(weight_type=config.weight_type, reduce_range=config.reduce_range, per_channel=config.per_channel)
    candidate = Candidate("dynamic", config.weight_type, config.per_channel, config.reduce_range)
    quantize_dynamic_file(source, target, candidate, config.op_types, config.exclude_nodes)
    return f"{config.weight_type}-dynamic"


class _Rows:
    """onnxruntime CalibrationDataReader over tokenized rows (one row per batch: no padding skews ranges)."""

    def __init__(self, feeds: list[dict[str, Any]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # part of the reader protocol; each calibrator reads once
        pass


def _static(artifact: Artifact, target: Path, config: QuantizeOnnxConfig, ctx: StepContext) -> str:
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    from compressor.models.loading import load_tokenizer
    from compressor.models.training import sample_rows

    if ctx.data is None or not ctx.data.has("train"):
        raise StepError("static quantization needs calibration data", hint="add data.train to the recipe")
    graph = onnx.load(str(artifact.model_file), load_external_data=False).graph
    fused = sorted({n.op_type for n in graph.node if n.domain == "com.microsoft"})
    if fused:  # check() refuses optimize-onnx before static; this catches fused graphs from elsewhere
        raise StepError(f"static quantization cannot type the outputs of onnxruntime's fused operators "
                        f"({', '.join(fused)}) and would leave their activations float",
                        hint="quantize the unfused export, or use mode: dynamic")
    inputs = [i.name for i in graph.input]
    op_types = [t for t in (config.op_types or STATIC_OP_TYPES) if t not in config.exclude_op_types]
    tokenizer = load_tokenizer(artifact.path)
    from compressor.tasks import task_for

    spec = task_for(artifact.task)
    rows = sample_rows(ctx.data.load("train"), config.calibration_rows or 128, ctx.seed)
    # MinMax reads each row unpadded; the histogram calibrators need one shape, so pad to the longest row.
    length = None
    if config.calibration != "minmax":
        length = max(len(spec.encode(tokenizer, [r.text], artifact.max_length, tensors=None, padding=False)["input_ids"][0])
                     for r in rows)
    feeds = []
    for row in rows:
        enc = spec.encode(tokenizer, [row.text], length or artifact.max_length,
                          padding="max_length" if length else False)
        feeds.append({k: enc[k].astype(np.int64) for k in inputs if k in enc})
    reader = type("Reader", (_Rows, CalibrationDataReader), {})(feeds)
    reduce_range = config.reduce_range
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.calibration]
    ctx.report(calibration=config.calibration, calibration_rows=len(feeds), reduce_range=reduce_range,
               op_types=op_types)
    quantize_static(str(artifact.model_file), str(target), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=op_types, per_channel=config.per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=config.exclude_nodes, calibrate_method=method)
    return "int8-static-qdq"


def blockwise_int4(model: Any, config: QuantizeOnnxConfig, op_types: tuple[str, ...]) -> Any:
    """onnxruntime's blockwise int4 quantizer on `model` (in place): MatMul weights become MatMulNBits and
    Gather tables GatherBlockQuantized (int4 tensor type), blocked along the hidden axis. Returns its
    ONNXModel; `.model` is the ModelProto."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    algorithm = getattr(config, "algorithm", "minmax")
    proto = model.model if hasattr(model, "model") else model
    eight = int8_matmuls(proto, getattr(config, "int8_nodes", []))
    if eight and "MatMul" in op_types:
        # 8-bit first; those nodes are MatMulNBits afterwards, so the 4-bit passes below leave them alone
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in eight]
        first8 = nbits.MatMulNBitsQuantizer(model, bits=8, block_size=config.int8_block_size or config.block_size,
                                            is_symmetric=config.symmetric,
                                            accuracy_level=config.accuracy_level,
                                            nodes_to_exclude=others + list(config.exclude_nodes),
                                            op_types_to_quantize=("MatMul",))
        first8.process()
        model = first8.model.model
    if algorithm != "minmax" and "MatMul" in op_types:
        # the named algorithm fits the MatMuls; a second, plain pass takes the Gather tables
        algo_config = {"rtn": lambda: nbits.RTNWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",)),
                       "k_quant": lambda: nbits.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",)),
                       "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size,
                                                                     op_types_to_quantize=("MatMul",))}[algorithm]()
        first = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size, is_symmetric=config.symmetric,
                                           accuracy_level=config.accuracy_level, nodes_to_exclude=config.exclude_nodes,
                                           op_types_to_quantize=("MatMul",), algo_config=algo_config)
        first.process()
        rest = tuple(o for o in op_types if o != "MatMul")
        if not rest:
            return first.model
        model, op_types = first.model.model, rest
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=config.block_size, is_symmetric=config.symmetric,
                                           accuracy_level=config.accuracy_level, nodes_to_exclude=config.exclude_nodes,
                                           op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    return quantizer.model


def int8_matmuls(model: Any, patterns: list[str]) -> list[str]:
    """Names of the MatMuls with a weight initializer whose name matches one of the regular expressions."""
    if not patterns:
        return []
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
            and any(re.search(p, n.name) for p in patterns)]


def _int4(source: Path, target: Path, config: QuantizeOnnxConfig, ctx: StepContext,
          sequences: list[list[int]] | None = None) -> str:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    weights = {t.name: t for t in model.graph.initializer}
    eight_block = config.int8_block_size or config.block_size
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            k = numpy_helper.to_array(weights[node.input[1]]).shape[0]
            for size in {config.block_size, eight_block}:
                if k % size:
                    raise StepError(f"block size {size} does not divide {node.name}'s input width {k}",
                                    hint="choose a block size that divides every layer width")
    op_types = tuple(config.op_types or ("MatMul",))
    unknown = set(op_types) - {"MatMul", "Gather"}
    if unknown:
        raise StepError(f"int4 quantizes MatMul and Gather only, not {', '.join(sorted(unknown))}",
                        hint="set op_types to [MatMul], [Gather] or both")
    opset = onnx_opset(model, 21)
    if "Gather" in op_types and opset < 21:
        # int4 tables need opset 21, and the quantizer only relabels the opset: an older graph's operators
        # (ReduceMean's axes attribute in an RMSNorm, say) would then be invalid. Convert them properly.
        from onnx import version_converter

        model = version_converter.convert_version(model, 21)
        ctx.report(opset_converted=f"{opset} -> 21")
    untied = untie_transposed_weights(model)
    tied: dict[str, str] = {}
    eight = int8_matmuls(model, config.int8_nodes)
    unmatched = [p for p in config.int8_nodes if not any(re.search(p, name) for name in eight)]
    if unmatched:
        raise StepError(f"int8_nodes pattern {unmatched[0]!r} matches no MatMul with a weight",
                        hint="name MatMul nodes as the graph does, e.g. 'layers\\.0/.*down_proj' (see the model "
                             "in Netron)")
    solved = []
    if config.algorithm == "gptq" and "MatMul" in op_types:
        from compressor.plugins.quantize_onnx.gptq import gptq_matmuls

        weights = {t.name for t in model.graph.initializer}
        nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
                 and n.name not in config.exclude_nodes]
        tied = tied_tables(model, nodes)
        alphas: list[float] = []
        solved = gptq_matmuls(model, source, nodes, set(eight), sequences or [], (config.block_size, eight_block),
                              config.symmetric, config.accuracy_level, threads=0, search=config.clip_search,
                              refit=config.refit_scales, awq=config.awq, protected=set(tied.values()),
                              awq_alphas=alphas)
        if config.awq:
            ctx.report(awq_scaled_groups=len(alphas),
                       awq_alpha_median=statistics.median(alphas) if alphas else None)
        op_types = tuple(o for o in op_types if o != "MatMul")
    if op_types:
        quantized = blockwise_int4(model, config, op_types)
    else:
        from onnxruntime.quantization.onnx_model import ONNXModel

        quantized = ONNXModel(model)
    packed = pack_gather_tables(quantized.model)
    shared = share_tied_tables(quantized.model, tied)
    quantized.save_model_to_file(str(target), use_external_data_format=False)
    ctx.report(block_size=config.block_size, **({"int8_block_size": eight_block} if eight else {}),
               symmetric=config.symmetric, accuracy_level=config.accuracy_level, algorithm=config.algorithm,
               op_types=list(config.op_types or ("MatMul",)), packed_gather_tables=packed,
               **({"int8_nodes": eight} if eight else {}),
               **({"untied": untied} if untied else {}), **({"shared_tables": shared} if shared else {}),
               **({"gptq_nodes": len(solved), "calibration_sequences": len(sequences or [])} if solved else {}))
    return f"int4-block{config.block_size}"


def tied_tables(model: Any, matmuls: list[str]) -> dict[str, str]:
    """Gather tables that untie_transposed_weights split from one of these MatMuls' weights (`W` and `W.T`),
    mapped to that weight's name."""
    chosen = set(matmuls)
    weights = {n.input[1] for n in model.graph.node if n.name in chosen}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    return {t: w for t in tables for w in weights if t == f"{w}.T" or w == f"{t}.T"}


def untie_transposed_weights(model: Any) -> list[str]:
    """MatMuls (weight input) and Gathers (table input) that read a weight through a Transpose of an
    initializer get the transposed weight as their own initializer. A tied LM head or embedding reads the
    shared table so (onnxruntime-genai's builder transposes it for the embedding), and
    the int4 quantizer packs initializers only: it would leave the largest matrix of a small LLM in float.
    Returns the nodes changed; `share_tied_tables` dedupes the two quantized copies afterwards."""
    from onnx import numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    changed, dropped = [], set()
    for node in graph.node:
        slot = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if slot is None or node.input[slot] not in producer:
            continue
        transpose = producer[node.input[slot]]
        if transpose.op_type != "Transpose" or transpose.input[0] not in weights:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        array = numpy_helper.to_array(weights[transpose.input[0]])
        if array.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{transpose.input[0]}.T"
        if name not in weights:
            tensor = numpy_helper.from_array(array.T.copy(), name)
            graph.initializer.append(tensor)
            weights[name] = tensor
        node.input[slot] = name
        changed.append(node.name)
        dropped.add(transpose.name)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.name in dropped and n.output[0] not in used]:
        graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    return changed


#: Bytes allowed to differ between a tied head's and table's int4 copies: onnxruntime packs MatMul weights in
#: C++ and Gather tables in numpy, which round a value exactly halfway between two steps differently (measured:
#: 14 of 14.2 million bytes on the edge SmolLM2); beyond this the two are not the same table.
TIE_MISMATCH = 1e-5


def share_tied_tables(model: Any, tied: dict[str, str] | None = None) -> list[str]:
    """A packed int4 embedding table that holds the bytes and scales of an int4 MatMul's weight (a tied LM head,
    quantized the same way) is read from that weight through a Reshape instead of stored twice, as
    onnxruntime-genai's builder does: the second copy of a small LLM's largest matrix goes. The scales must be
    equal and all but TIE_MISMATCH of the bytes (rounding ties): the embedding then reads the head's rounding.
    `tied` maps tables (by initializer name before quantization) to the MatMul weight they are the transpose
    of, where the head's codes are to be shared whatever the table's own rounding (GPTQ fits the head's codes
    to its inputs; the table then reads those codes). Returns the GatherBlockQuantized nodes now sharing."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    tables = {t.name: t for t in graph.initializer}
    heads = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) <= 3 and node.input[1] in tables:
            attrs = {a.name: a.i for a in node.attribute}
            if attrs.get("bits", 4) == 4 and node.input[2] in tables:
                heads[(attrs["N"], attrs["K"], attrs["block_size"])] = node
    shared = []
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized" or len(node.input) > 3 or node.input[0] not in tables:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        data = numpy_helper.to_array(tables[node.input[0]])
        if data.dtype != np.uint8 or data.ndim != 2 or attrs.get("gather_axis", 0) or attrs.get("quantize_axis") != 1:
            continue
        head = heads.get((data.shape[0], data.shape[1] * 2, attrs.get("block_size", 128)))
        if head is None:
            continue
        packed, scales = (numpy_helper.to_array(tables[head.input[i]]) for i in (1, 2))
        own_scales = numpy_helper.to_array(tables[node.input[2]])
        if packed.size != data.size or scales.size != own_scales.size:
            continue
        forced = (tied or {}).get(node.input[0].removesuffix("_Q4")) == head.input[1].removesuffix("_Q4")
        differ = int(np.count_nonzero(packed.reshape(data.shape) != data))
        if not forced and (differ > TIE_MISMATCH * data.size
                           or not np.array_equal(scales.reshape(own_scales.shape), own_scales)):
            continue
        inputs = []
        for source, shape in ((head.input[1], data.shape), (head.input[2], own_scales.shape)):
            shape_name = f"{node.name}/shared_shape_{len(inputs)}"
            graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
            out = f"{node.name}/shared_{len(inputs)}"
            graph.node.insert(0, helper.make_node("Reshape", [source, shape_name], [out], name=f"{out}/Reshape"))
            inputs.append(out)
        stale = [node.input[0], node.input[2]]
        node.input[0], node.input[2] = inputs
        for name in stale:
            graph.initializer.remove(tables.pop(name))
        shared.append(node.name)
    return shared


def pack_gather_tables(model: Any) -> int:
    """Store symmetric int4 GatherBlockQuantized tables as uint8 bytes holding two 4-bit values (zero point 8).

    The values and scales are unchanged; onnxruntime (>= 1.22) looks rows up about 4x faster from this
    layout than from the int4 tensor type (measured: 21 µs against 93 µs for 25 rows of a 13k×384 table),
    which is a tenth of the edge model's batch-1 time. Returns how many tables were repacked."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    tables = {t.name: t for t in model.graph.initializer}
    packed = 0
    for node in model.graph.node:
        if node.op_type != "GatherBlockQuantized" or node.input[0] not in tables or any(node.input[3:4]):
            continue  # a zero-point input means asymmetric blocks; keep onnxruntime's own layout
        if sum(node.input[0] in other.input for other in model.graph.node) > 1:
            continue  # another operator reads the same table in its int4 layout
        table = tables[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        if (table.data_type != TensorProto.INT4 or len(table.dims) != 2 or table.dims[1] % 2
                or attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis", 1) != 1):
            continue
        nibbles = (numpy_helper.to_array(table).astype(np.int16) + 8).astype(np.uint8)  # -8..7 -> 0..15
        data = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)  # element 2k in the low nibble, as MatMulNBits
        table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(data), table.name))
        packed += 1
    return packed


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `quantize-onnx` step."""
    register(QuantizeOnnx)
