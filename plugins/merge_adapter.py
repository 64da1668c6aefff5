"""`merge-adapter`: merge one or several PEFT adapters (LoRA and any adapter PEFT can merge) into
the base model with `merge_and_unload(safe_merge=True)`; several adapters are first combined with
PEFT's `add_weighted_adapter` (linear, ties, dare_ties, …)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.models.artifact import Artifact
from compressor.errors import CompressorError, RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.step import PlanContext, Step, StepConfig, StepContext

Combination = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                      "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


class AdapterSpec(BaseModel):
    """One adapter and its weight in the combination."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Directory written by peft's save_pretrained (adapter_config.json).")
    weight: float = Field(default=1.0, ge=-10, le=10, description="Weight in the combination.")


class MergeAdapterConfig(StepConfig):
    """Settings of `merge-adapter`."""

    adapter: str | None = Field(default=None, description="One adapter directory (shorthand for adapters).")
    adapters: list[AdapterSpec] = Field(default_factory=list, description="Several adapters with weights.")
    combination: Combination = Field(default="linear", description="How several adapters are combined "
                                                                   "(peft add_weighted_adapter).")
    density: float | None = Field(default=None, gt=0, le=1, description="Fraction kept by ties/dare/magnitude_prune.")

    @model_validator(mode="after")
    def _exactly_one_form(self) -> "MergeAdapterConfig":
        if bool(self.adapter) == bool(self.adapters):
            raise ValueError("give either adapter: PATH or adapters: [{path, weight}, …]")
        if self.combination not in ("linear", "cat", "svd") and self.density is None and len(self.all()) > 1:
            raise ValueError(f"combination {self.combination!r} needs density (0 < density ≤ 1)")
        return self

    def all(self) -> list[AdapterSpec]:
        """Every adapter with its weight."""
        return [AdapterSpec(path=self.adapter)] if self.adapter else list(self.adapters)


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """(adapter_config.json, {tensor name: shape}) without loading any weights."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise RecipeError(f"{path} is not a PEFT adapter (no adapter_config.json)",
                          hint="give a directory written by PeftModel.save_pretrained")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    shapes: dict[str, list[int]] = {}
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        from compressor.recipe.model_input import check_safetensors

        check_safetensors(weights, "")

        with safe_open(str(weights), framework="numpy") as fh:
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    elif (path / "adapter_model.bin").is_file():
        raise RecipeError(f"{path} holds pickled adapter weights (adapter_model.bin), which are not loaded",
                          hint="re-save the adapter with safe_serialization=True")
    return config, shapes


def check_adapter_fits(path: Path, model_config: dict[str, Any], labels: list[str]) -> None:
    """The adapter's shapes must be those of this base: hidden sizes, layer count, head size."""
    config, shapes = read_adapter(path)
    hidden = model_config.get("hidden_size")
    widths = {hidden, model_config.get("intermediate_size")}
    n_layers = model_config.get("num_hidden_layers")
    for name, shape in shapes.items():
        if ".lora_A." in name and len(shape) == 2 and shape[1] not in widths:
            raise RecipeError(f"adapter {path.name} was trained on another base: {name} reads {shape[1]} features, "
                              f"this model's widths are {sorted(w for w in widths if w)}",
                              hint="merge an adapter trained on this base model")
        if ".layer." in name and isinstance(n_layers, int):
            index = name.split(".layer.")[1].split(".")[0]
            if index.isdigit() and int(index) >= n_layers:
                raise RecipeError(f"adapter {path.name} has layer {index}; this model has {n_layers} layers",
                                  hint="merge an adapter trained on this base model")
        if name.endswith("classifier.weight") and labels and shape[0] != len(labels):
            raise RecipeError(f"adapter {path.name} has a {shape[0]}-label head; this model has {len(labels)} labels")


class MergeAdapter(Step):
    """Merge PEFT adapters into the model."""

    name = "merge-adapter"
    summary = "Merge LoRA (or any PEFT-mergeable) adapters into the model; several with ties/dare/linear."
    version = "1"
    Config = MergeAdapterConfig
    accepts = ("hf",)
    produces = "hf"
    requires = ("peft",)

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """Every adapter exists and fits this base (shapes from its safetensors header)."""
        assert isinstance(config, MergeAdapterConfig)
        for i, spec in enumerate(config.all()):
            path = ctx.resolve(spec.path)
            where = "with.adapter" if config.adapter else f"with.adapters[{i}].path"
            if not path.is_dir():
                raise RecipeError(f"adapter directory {path} does not exist", where=where,
                                  hint="paths are relative to the recipe file")
            try:
                check_adapter_fits(path, ctx.model_config, ctx.labels)
            except CompressorError as exc:
                exc.where = where
                raise

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Load the adapters onto the model, combine them, merge safely, save."""
        assert isinstance(config, MergeAdapterConfig)
        from peft import PeftModel

        from compressor.models import load_model, save_model

        if artifact.info.quantized:
            raise StepError(f"the model is already quantized ({artifact.info.quantized}); adapters merge into "
                            "float weights", hint="put merge-adapter before the quantization step")
        base = load_model(artifact)
        specs = config.all()
        names = [f"a{i}" for i in range(len(specs))]
        try:
            model = PeftModel.from_pretrained(base, str(ctx.resolve(specs[0].path)), adapter_name=names[0])
            for name, spec in zip(names[1:], specs[1:]):
                model.load_adapter(str(ctx.resolve(spec.path)), adapter_name=name)
            if len(specs) > 1:
                kwargs = {"density": config.density} if config.density is not None else {}
                model.add_weighted_adapter(names, [s.weight for s in specs], adapter_name="merged",
                                           combination_type=config.combination, **kwargs)
                model.set_adapter("merged")
            elif specs[0].weight != 1.0:
                model.add_weighted_adapter(names, [specs[0].weight], adapter_name="merged", combination_type="linear")
                model.set_adapter("merged")
            merged = model.merge_and_unload(safe_merge=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise StepError(f"cannot merge: {exc}".splitlines()[0][:500],
                            hint="check that every adapter was trained on this base model") from None
        ctx.report(adapters=[s.path for s in specs], weights=[s.weight for s in specs],
                   combination=config.combination if len(specs) > 1 else "single")
        return save_model(merged, artifact, ctx.out_dir)


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `merge-adapter` step."""
    register(MergeAdapter)
