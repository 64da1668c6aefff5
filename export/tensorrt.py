"""`export-tensorrt` (`onnx` → `engine`): a TensorRT engine built with the TensorRT Python API —
fp16, or int8 from a QDQ model (explicit quantization: the scales come from `quantize-onnx`'s
static mode, TensorRT does no calibration of its own).

An engine is specific to the GPU model and the TensorRT version that built it, so the build
settings and both versions are recorded in `artifact.json` (and so in record.json and the report).
`compressor check` refuses the step before any work where no NVIDIA GPU or no `tensorrt` package is
present (install the `tensorrt` and `gpu` extras on a GPU machine).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from compressor.models.artifact import Artifact, copy_companions
from compressor.errors import InputError, RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.models.formats import Format
from compressor.step import PlanContext, Step, StepConfig, StepContext

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class ExportTensorrtConfig(StepConfig):
    """Settings of `export-tensorrt`."""

    precision: Literal["fp16", "int8", "fp32"] = Field(
        default="fp16", description="fp16: float16 kernels where TensorRT finds them faster; int8: the QDQ scales "
                                    "of a statically quantized model (quantize-onnx mode: static) plus fp16; fp32.")
    max_batch: int = Field(default=32, ge=1, le=4096, description="Largest batch the engine accepts.")
    max_length: int = Field(default=128, ge=8, le=8192, description="Longest sequence the engine accepts.")
    opt_length: int = Field(default=64, ge=1, le=8192, description="Sequence length TensorRT tunes kernels for.")
    workspace_gb: float = Field(default=4.0, gt=0, le=512, description="Builder workspace memory limit.")


def gpu_problem() -> str | None:
    """Why an engine cannot be built here (None if it can): no tensorrt package, or no NVIDIA GPU."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the `tensorrt` Python package is not installed (pip install 'compressor[tensorrt,gpu]')"
    if not (Path("/dev/nvidia0").exists() or os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1")):
        return "no NVIDIA GPU is visible on this machine (/dev/nvidia0 is missing)"
    return None


class ExportTensorrt(Step):
    """Build a TensorRT engine from the ONNX model."""

    name = "export-tensorrt"
    summary = "TensorRT engine (fp16, or int8 from a QDQ model) with the TensorRT Python API; needs an NVIDIA GPU."
    version = "1"
    Config = ExportTensorrtConfig
    accepts = ("onnx",)
    produces = "engine"

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """Refuse before any work where no engine can be built."""
        assert isinstance(config, ExportTensorrtConfig)
        contrib = ctx.after("optimize-onnx") or next(
            (f"steps[{i}] (quantize-onnx mode: {c.mode})" for i, (uses, c) in enumerate(ctx.earlier)
             if uses == "quantize-onnx" and getattr(c, "mode", None) in ("dynamic", "int4")), None)
        if contrib:
            raise RecipeError(f"{contrib} writes onnxruntime-only operators, which TensorRT cannot parse",
                              where="uses", hint="for TensorRT, quantize with mode: static (QDQ) and leave "
                                                 "optimize-onnx out; TensorRT fuses the graph itself")
        problem = gpu_problem()
        if problem:
            raise RecipeError(f"export-tensorrt cannot run here: {problem}", where="uses",
                              hint="run this recipe on a machine with an NVIDIA GPU, or remove the step")
        if config.opt_length > config.max_length:
            raise RecipeError("opt_length is longer than max_length", where="with.opt_length")

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Parse the ONNX model, build and serialize the engine, record the build settings."""
        assert isinstance(config, ExportTensorrtConfig)
        import tensorrt as trt

        problem = gpu_problem()
        if problem:
            raise StepError(f"export-tensorrt cannot run here: {problem}")
        if config.precision == "int8" and artifact.info.quantized != "int8-static-qdq":
            raise StepError("precision int8 needs a QDQ model", hint="add quantize-onnx with mode: static before it")
        import onnx

        contrib = sorted({n.op_type for n in onnx.load(str(artifact.model_file), load_external_data=False).graph.node
                          if n.domain == "com.microsoft"})
        if contrib:
            raise StepError(f"the model uses onnxruntime-only operators TensorRT cannot parse: {', '.join(contrib)}",
                            hint="leave optimize-onnx, dynamic and int4 quantization out of a TensorRT chain")
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(artifact.model_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise StepError(f"TensorRT cannot parse the ONNX model: {errors}")
        build = builder.create_builder_config()
        build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
        if config.precision in ("fp16", "int8"):
            build.set_flag(trt.BuilderFlag.FP16)
        if config.precision == "int8":
            build.set_flag(trt.BuilderFlag.INT8)
        profile = builder.create_optimization_profile()
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        for name in names:
            profile.set_shape(name, (1, 1), (1, config.opt_length), (config.max_batch, config.max_length))
        build.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, build)
        if serialized is None:
            raise StepError("TensorRT could not build an engine (see the TensorRT messages above)")
        (ctx.out_dir / "model.engine").write_bytes(bytes(serialized))
        copy_companions(artifact, ctx.out_dir)  # config and tokenizer beside the engine
        settings = {**config.model_dump(mode="json"), "inputs": names, "tensorrt": trt.__version__,
                    "gpu": _gpu_name()}
        ctx.report(**{f"build_{k}": v for k, v in settings.items() if not isinstance(v, list)})
        return artifact.derive(ctx.out_dir, format="engine", build=settings)


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?"
    except Exception:  # the name is informative only
        return "?"


def engine_forward(path: Path) -> Callable[[dict[str, Any]], Any]:
    """A function running the engine on a batch of numpy inputs (CUDA buffers through torch)."""
    import numpy as np
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    output = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def forward(batch: dict[str, Any]) -> Any:
        held = {}
        for name in inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(batch[name])).to("cuda")
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            held[name] = tensor.to(getattr(torch, np.dtype(dtype).name))
            context.set_input_shape(name, tuple(held[name].shape))
            context.set_tensor_address(name, held[name].data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape(output)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(output, out.data_ptr())
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()

    return forward


@hookimpl
def load_forward(artifact: Artifact, threads: int) -> tuple[Callable[[dict[str, Any]], Any], list[str]] | None:
    """Run `engine` artifacts (TensorRT plans) on the GPU; None for every other format."""
    if artifact.format != "engine":
        return None
    problem = gpu_problem()
    if problem:
        raise InputError(f"cannot run a TensorRT engine here: {problem}", where=str(artifact.path))
    return engine_forward(artifact.model_file), list(artifact.info.build["inputs"])


@hookimpl
def register_formats(register: Callable[[Format], None]) -> None:
    """`engine`: a TensorRT plan, run on the GPU by this plugin's load_forward."""
    register(Format("engine", "a TensorRT engine (plan), run on an NVIDIA GPU by export-tensorrt",
                    model_file="model.engine"))


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `export-tensorrt` step."""
    register(ExportTensorrt)
