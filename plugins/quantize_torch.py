"""`quantize-torch` (`hf` → `hf`): dynamic int8 Linear layers with torch.ao, for users who stay in PyTorch.

torch's quantized Linear keeps packed parameters that safetensors cannot hold, so the artifact
stores each int8 weight with its scale and zero point as plain tensors in `model.int8.safetensors`
(no pickle), and config.json names the layers left in float (`compressor_torch_int8`); this plugin's
`load_hf_model` hook rebuilds the quantized model from them wherever compressor loads that directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from compressor.models.artifact import Artifact
from compressor.errors import StepError
from compressor.hookspecs import hookimpl
from compressor.step import Step, StepConfig, StepContext

INT8_FILE = "model.int8.safetensors"
#: config.json key of a quantize-torch directory: {"skip_modules": [...]}.
CONFIG_KEY = "compressor_torch_int8"


class QuantizeTorchConfig(StepConfig):
    """Settings of `quantize-torch`."""

    dtype: Literal["qint8"] = Field(default="qint8", description="Weight type of the quantized Linear layers.")
    skip_modules: list[str] = Field(default_factory=lambda: ["classifier"],
                                    description="Module names (prefixes) left in float; the task head by default.")


def quantize_dynamic(model: Any, skip: list[str]) -> Any:
    """torch.ao dynamic int8 of every Linear except those under `skip`."""
    import torch

    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not any(n == s or n.startswith(s + ".") for s in skip)}
    return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8)


class QuantizeTorch(Step):
    """Dynamic int8 quantization of Linear layers with torch.ao."""

    name = "quantize-torch"
    summary = "Dynamic int8 Linear layers with torch.ao (stays a PyTorch model)."
    version = "2"  # 2: config.json names the float layers; loaded through load_hf_model
    Config = QuantizeTorchConfig
    accepts = ("hf",)
    produces = "hf"

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Quantize and save int8 weights, scales and the float rest as safetensors."""
        assert isinstance(config, QuantizeTorchConfig)
        import torch
        from safetensors.torch import save_file

        from compressor.models import copy_tokenizer, load_model

        if artifact.info.quantized:
            raise StepError(f"the model is already quantized ({artifact.info.quantized})")
        torch.set_num_threads(ctx.threads)
        model = quantize_dynamic(load_model(artifact), config.skip_modules)
        tensors: dict[str, Any] = {}
        quantized = []
        for name, module in model.named_modules():
            if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
                weight, bias = module._weight_bias()
                tensors[f"{name}.weight.int8"] = weight.int_repr().contiguous()
                tensors[f"{name}.weight.scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
                tensors[f"{name}.weight.zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
                if bias is not None:
                    tensors[f"{name}.bias"] = bias.detach().contiguous()
                quantized.append(name)
        for key, value in model.state_dict().items():
            if isinstance(value, torch.Tensor) and not value.is_quantized and not any(
                    key.startswith(q + ".") for q in quantized):
                tensors[key] = value.detach().contiguous()
        save_file(tensors, str(ctx.out_dir / INT8_FILE), metadata={"format": "compressor-torch-dynamic-int8"})
        setattr(model.config, CONFIG_KEY, {"skip_modules": list(config.skip_modules)})
        model.config.save_pretrained(str(ctx.out_dir))
        copy_tokenizer(artifact.path, ctx.out_dir)
        ctx.report(quantized_linear_layers=len(quantized), skipped=config.skip_modules)
        return artifact.derive(ctx.out_dir, quantized="torch-dynamic-int8", skip_modules=config.skip_modules)


def load_torch_int8(path: Any, task: str, skip: list[str]) -> Any:
    """Rebuild a `quantize-torch` model: float skeleton from config, quantize, then load the stored tensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from compressor.tasks import task_for

    cls = task_for(task).model_class()
    model = quantize_dynamic(cls.from_config(AutoConfig.from_pretrained(str(path))), skip)
    tensors = load_file(str(Path(path) / INT8_FILE))
    for name, module in model.named_modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight = torch._make_per_tensor_quantized_tensor(
                tensors.pop(f"{name}.weight.int8"), float(tensors.pop(f"{name}.weight.scale")),
                int(tensors.pop(f"{name}.weight.zero_point")))
            module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    state = model.state_dict()  # holds the packed int8 weights just set
    unexpected = [k for k in tensors if k not in state]
    if unexpected:
        raise StepError(f"{Path(path) / INT8_FILE} holds tensors the model does not have: {unexpected[:3]}")
    state.update(tensors)
    model.load_state_dict(state)
    return model.eval()


@hookimpl
def load_hf_model(path: str, task: str, config: dict[str, Any]) -> Any | None:
    """Rebuild directories that `quantize-torch` wrote (their config.json carries CONFIG_KEY)."""
    if CONFIG_KEY not in config:
        return None
    return load_torch_int8(Path(path), task, list(config[CONFIG_KEY].get("skip_modules", [])))


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `quantize-torch` step."""
    register(QuantizeTorch)
