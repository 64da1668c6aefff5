"""`export-onnx`: `hf` → `onnx` with the optimum-onnx exporter (or, for decoder LLMs, onnxruntime-genai's
model builder), then a parity check against PyTorch."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from compressor.artifact import Artifact
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.models import copy_tokenizer, onnx_opset
from compressor.step import PlanContext, Step, StepConfig, StepContext

#: Architectures the onnxruntime-genai 0.15 model builder writes (a subset we have run: Llama-family decoders).
GENAI_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM",
                       "GemmaForCausalLM", "Gemma2ForCausalLM", "OlmoForCausalLM", "GraniteForCausalLM")
GENAI_HINT = "pip install 'onnxruntime-genai==0.15.2' (the newest builder that works with transformers 4.57)"

#: Used for the parity check when the recipe has no data.
FALLBACK_TEXTS = ["a gripping , beautifully made film .", "the plot is thin and the jokes fall flat .",
                  "EU rejects German call to boycott British lamb .", "Peter Blackburn reports from Brussels ."]


class ExportOnnxConfig(StepConfig):
    """Settings of `export-onnx`."""

    opset: int = Field(default=17, ge=11, le=23, description="ONNX opset version.")
    atol: float = Field(default=1e-4, gt=0, le=10, description="Largest allowed |logit difference| between "
                                                              "PyTorch and ONNX Runtime in the parity check.")
    parity_rows: int = Field(default=32, ge=1, le=10_000, description="Real rows used by the parity check.")
    exporter: Literal["optimum", "onnxruntime-genai"] = Field(
        default="optimum", description="optimum-onnx's exporter, or (decoder LLMs) onnxruntime-genai's model "
                                       "builder, whose graph has fused GroupQueryAttention with rotary embeddings "
                                       "and fused RMSNorms: about 1.5x the int4 decode speed of the optimum graph.")


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
    version = "2"  # 2: exporter
    Config = ExportOnnxConfig
    accepts = ("hf",)
    produces = "onnx"

    def cache_extra(self, config: StepConfig) -> Any:
        """The builder's version keys a builder export."""
        assert isinstance(config, ExportOnnxConfig)
        if config.exporter != "onnxruntime-genai":
            return None
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"onnxruntime-genai": version("onnxruntime-genai")}
        except PackageNotFoundError:
            return {"onnxruntime-genai": None}

    def supports(self, config: StepConfig, task: Any, model_config: dict[str, Any]) -> str | None:
        """The model builder writes decoder LLMs with a KV cache, of the architectures it knows."""
        assert isinstance(config, ExportOnnxConfig)
        if config.exporter != "onnxruntime-genai":
            return None
        arch = (model_config.get("architectures") or [None])[0]
        if task.export_task != "text-generation-with-past" or arch not in GENAI_ARCHITECTURES:
            return (f"exporter onnxruntime-genai writes decoder LLMs ({', '.join(GENAI_ARCHITECTURES)}); this is a "
                    f"{task.name} model ({arch})")
        heads, hidden = model_config.get("num_attention_heads"), model_config.get("hidden_size")
        head_dim = model_config.get("head_dim") or (hidden // heads if heads and hidden else None)
        if head_dim and head_dim % 16:
            return (f"exporter onnxruntime-genai writes onnxruntime's GroupQueryAttention, whose CPU kernel needs "
                    f"heads a multiple of 16 wide; this model's are {head_dim}: use exporter: optimum")
        return None

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """The model builder must be installed."""
        assert isinstance(config, ExportOnnxConfig)
        if config.exporter == "onnxruntime-genai" and importlib.util.find_spec("onnxruntime_genai") is None:
            raise RecipeError("exporter onnxruntime-genai needs the onnxruntime-genai package, which is not installed",
                              where="with.exporter", hint=GENAI_HINT + ", or use exporter: optimum")

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
        opset = config.opset
        try:
            if config.exporter == "onnxruntime-genai":
                if custom is not None:
                    raise StepError("exporter onnxruntime-genai reads transformers checkpoints, not a plugin's layout",
                                    hint="use exporter: optimum")
                opset = build_with_genai(artifact.path, ctx.out_dir)
            elif custom is None:
                main_export(str(artifact.path), output=str(ctx.out_dir), task=export_task, opset=config.opset,
                            do_validation=False, local_files_only=True, library_name="transformers")
            else:
                from optimum.exporters.onnx import onnx_export_from_model

                onnx_export_from_model(custom.eval(), output=str(ctx.out_dir), task=export_task,
                                       opset=config.opset, do_validation=False)
                copy_tokenizer(artifact.path, ctx.out_dir)
        except StepError:
            raise
        except Exception as exc:  # the exporter raises many kinds; all mean the same to the user
            raise StepError(f"ONNX export failed: {type(exc).__name__}: {exc}",
                            hint="try another opset, or run with --debug for the exporter's traceback") from exc
        out = artifact.derive(ctx.out_dir, format="onnx", opset=opset, exporter=config.exporter)
        check_parity(artifact, out, ctx, config.atol, config.parity_rows, "ONNX logits differ from PyTorch",
                     hint="raise with.atol if this difference is acceptable, or try another opset")
        return out


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
        # one file where protobuf allows (2 GB): the rest of the chain reads it like optimum's export
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
