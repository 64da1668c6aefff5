"""`export-onnx`: `hf` → `onnx`, then a parity check against PyTorch.

Encoders (classifiers, taggers) go through `torch.onnx.export` (export/encoder.py) into the layout
Optimum's ORTModel classes read; decoder LLMs through onnxruntime-genai's model builder, whose graph
(fused GroupQueryAttention with rotary embeddings, fused RMSNorms) and genai_config.json the generation
runtime, the int4 passes and onnxruntime-genai's own runtime read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from compressor.models.artifact import Artifact
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.models import copy_tokenizer, onnx_opset
from compressor.step import PlanContext, Step, StepConfig, StepContext

#: Decoder architectures the onnxruntime-genai 0.18 model builder writes that compressor runs and tests
#: (each through LoRA, merge, layer drop, export, int4 and a generation bundle on a tiny config). Not Gemma 2
#: (its sliding-window GroupQueryAttention needs a cache preallocated to the window, which a prompt-only
#: forward pass does not have) nor Gemma 3 (the 0.18 builder reads `rope_scaling`, which transformers 5's
#: Gemma3 config no longer has).
GENAI_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                       "Phi3ForCausalLM")
GENAI_HINT = "pip install 'compressor[genai]' (onnxruntime-genai 0.18, its model builder)"
#: The task layout that marks a decoder with a KV cache (what Optimum calls it).
DECODER_LAYOUT = "text-generation-with-past"
#: The encoder exporter `exporter: auto` picks: measured against dynamo on MiniLM (docs/results.md).
DEFAULT_ENCODER_EXPORTER = "torchscript"

#: Used for the parity check when the recipe has no data.
FALLBACK_TEXTS = ["a gripping , beautifully made film .", "the plot is thin and the jokes fall flat .",
                  "EU rejects German call to boycott British lamb .", "Peter Blackburn reports from Brussels ."]


class ExportOnnxConfig(StepConfig):
    """Settings of `export-onnx`."""

    opset: int = Field(default=17, ge=11, le=23, description="ONNX opset version (encoders; the builder sets its own).")
    atol: float = Field(default=1e-4, gt=0, le=10, description="Largest allowed |logit difference| between "
                                                              "PyTorch and ONNX Runtime in the parity check.")
    parity_rows: int = Field(default=32, ge=1, le=10_000, description="Real rows used by the parity check.")
    exporter: Literal["auto", "torchscript", "dynamo", "onnxruntime-genai"] = Field(
        default="auto", description="auto: torch.onnx's TorchScript exporter for encoders, onnxruntime-genai's model "
                                    "builder for decoder LLMs. torchscript / dynamo: torch.onnx's two exporters "
                                    "(encoders). onnxruntime-genai: the builder (decoders), whose graph has fused "
                                    "GroupQueryAttention with rotary embeddings and fused RMSNorms.")


def resolved_exporter(config: ExportOnnxConfig, task: Any) -> str:
    """The exporter this step uses for a model of `task`."""
    if config.exporter != "auto":
        return config.exporter
    return "onnxruntime-genai" if task.export_task == DECODER_LAYOUT else DEFAULT_ENCODER_EXPORTER


def parity_texts(ctx: StepContext, n: int, splits: tuple[str, ...] = ("eval", "train")) -> list[Any]:
    """Real rows for parity checks: the first of `splits` the recipe gives (eval data, else train data), else a
    few built-in sentences."""
    for split in splits:
        if ctx.data is not None and ctx.data.has(split):
            return [r.text for r in ctx.data.load(split)[:n]]
    return FALLBACK_TEXTS[:n]


def check_parity(reference: Artifact, candidate: Artifact, ctx: StepContext, atol: float, rows: int, what: str,
                 hint: str) -> None:
    """The task's parity check on real rows (for a classifier: the largest |logit difference|; for a generator
    also its greedy tokens); raise StepError when the difference exceeds `atol` or the task finds a problem."""
    from compressor.models.loading import logits_parity
    from compressor.tasks import task_for

    texts = parity_texts(ctx, rows)
    result = (task_for(reference.task).parity(reference, candidate, texts, ctx.threads)
              or logits_parity(reference, candidate, texts, ctx.threads))
    diff = result["max_abs_diff"]
    ctx.report(parity_max_abs_diff=diff, parity_atol=atol,
               **{f"parity_{k}": v for k, v in result.items() if k not in ("max_abs_diff", "problem")})
    if diff > atol:
        raise StepError(f"parity check failed: {what} by {diff:.3g} (atol {atol})", hint=hint)
    if result.get("problem"):
        raise StepError(f"parity check failed: {result['problem']}", hint=hint)


class ExportOnnx(Step):
    """Export a transformers model to ONNX (torch.onnx for encoders, onnxruntime-genai's builder for decoders)
    and check its logits against PyTorch."""

    name = "export-onnx"
    summary = "Export to ONNX (torch.onnx, or onnxruntime-genai's builder for LLMs), logits checked on real rows."
    version = "3"  # 3: torch.onnx for encoders, the builder for decoders
    Config = ExportOnnxConfig
    accepts = ("hf",)
    produces = "onnx"

    def supports(self, config: StepConfig, task: Any, model_config: dict[str, Any]) -> str | None:
        """Encoders go through torch.onnx; decoders through the model builder, of the architectures it writes."""
        assert isinstance(config, ExportOnnxConfig)
        exporter = resolved_exporter(config, task)
        arch = (model_config.get("architectures") or [None])[0]
        if task.export_task != DECODER_LAYOUT:
            if exporter == "onnxruntime-genai":
                return f"exporter onnxruntime-genai writes decoder LLMs; this is a {task.name} model ({arch})"
            return None
        if exporter != "onnxruntime-genai":
            return (f"decoder LLMs are exported by onnxruntime-genai's model builder (exporter: auto or "
                    f"onnxruntime-genai), not {exporter}")
        if arch not in GENAI_ARCHITECTURES:
            return (f"the {arch} family is not one compressor exports with onnxruntime-genai's builder; "
                    f"supported: {', '.join(GENAI_ARCHITECTURES)}")
        heads, hidden = model_config.get("num_attention_heads"), model_config.get("hidden_size")
        head_dim = model_config.get("head_dim") or (hidden // heads if heads and hidden else None)
        if head_dim and head_dim % 16:
            return (f"onnxruntime-genai's builder writes onnxruntime's GroupQueryAttention, whose CPU kernel needs "
                    f"heads a multiple of 16 wide; this model's are {head_dim}")
        return None

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """The chosen exporter's package must be installed."""
        assert isinstance(config, ExportOnnxConfig)
        from compressor.tasks import task_for

        exporter = resolved_exporter(config, task_for(ctx.task))
        if exporter == "onnxruntime-genai" and importlib.util.find_spec("onnxruntime_genai") is None:
            raise RecipeError("decoder LLMs are exported by onnxruntime-genai's model builder, which is not installed",
                              where="with.exporter", hint=GENAI_HINT)
        if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
            raise RecipeError("exporter dynamo needs the onnxscript package, which is not installed",
                              where="with.exporter", hint="pip install onnxscript, or use exporter: torchscript")

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Export into ctx.out_dir and raise StepError if the parity check fails."""
        assert isinstance(config, ExportOnnxConfig)
        if artifact.info.quantized:
            raise StepError(f"the model is quantized ({artifact.info.quantized}); export the float model",
                            hint="put quantize-torch last, or quantize after export with quantize-onnx")
        if artifact.info.adapter:
            raise StepError("the model carries an unmerged LoRA adapter",
                            hint="set merge: true on finetune, or add a merge-adapter step before export-onnx")
        from compressor.tasks import task_for

        task = task_for(artifact.task)
        exporter = resolved_exporter(config, task)
        opset = config.opset
        try:
            if exporter == "onnxruntime-genai":
                from compressor.models.loading import load_plugin_model

                if load_plugin_model(artifact.path, artifact.task) is not None:
                    raise StepError("onnxruntime-genai's builder reads transformers checkpoints, not a plugin's layout",
                                    hint="export the model before the plugin's step changes its layout")
                opset = build_with_genai(artifact.path, ctx.out_dir)
            else:
                export_with_torch(artifact, task, ctx.out_dir, opset, exporter)
        except StepError:
            raise
        except Exception as exc:  # the exporters raise many kinds; all mean the same to the user
            raise StepError(f"ONNX export failed ({exporter}): {type(exc).__name__}: {exc}",
                            hint="try another opset or exporter, or run with --debug for the traceback") from exc
        out = artifact.derive(ctx.out_dir, format="onnx", opset=opset, exporter=exporter)
        check_parity(artifact, out, ctx, config.atol, config.parity_rows, "ONNX logits differ from PyTorch",
                     hint="raise with.atol if this difference is acceptable, or try another opset or exporter")
        return out


def export_with_torch(artifact: Artifact, task: Any, out_dir: Path, opset: int, exporter: str) -> None:
    """An encoder through torch.onnx: model.onnx, the source's config.json and tokenizer files. A model in a
    plugin's own layout (say, low-rank Linears) is exported from the module the plugin's loader rebuilt."""
    from compressor.models.loading import load_tokenizer
    from compressor.export.encoder import export_encoder
    from compressor.models import load_model

    model = load_model(artifact)
    export_encoder(model, load_tokenizer(artifact.path), out_dir / "model.onnx", opset, exporter,
                   per_token=task.word_level, output=task.output_name)
    shutil.copy2(artifact.path / "config.json", out_dir / "config.json")
    copy_tokenizer(artifact.path, out_dir)


def build_with_genai(source: Path, out_dir: Path) -> int:
    """onnxruntime-genai's model builder: an FP32 CPU graph (model.onnx, genai_config.json) from a
    transformers checkpoint; our tokenizer files replace the builder's re-saved ones. Returns its opset."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    quiet = io.StringIO()  # the builder prints its options and a progress bar per tensor
    with (tempfile.TemporaryDirectory(prefix="genai-cache-") as cache, contextlib.redirect_stdout(quiet),
          contextlib.redirect_stderr(quiet)):
        args = ("", str(source), str(out_dir), "fp32", "cpu", cache)
        create_model(*args, **parse_extra_options(*args, []))
    import onnx

    model_file, data = out_dir / "model.onnx", out_dir / "model.onnx.data"
    if data.is_file() and data.stat().st_size < 1_800_000_000:
        # one file where protobuf allows (2 GB): the rest of the chain reads it like an encoder's export
        model = onnx.load(str(model_file))
        onnx.save_model(model, str(model_file))
        data.unlink()
    else:
        model = onnx.load(str(model_file), load_external_data=False)
    copy_tokenizer(source, out_dir)
    for name in ("generation_config.json", "config.json"):
        if (source / name).is_file():
            (out_dir / name).write_bytes((source / name).read_bytes())
    return onnx_opset(model, 0)


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `export-onnx` step."""
    register(ExportOnnx)
