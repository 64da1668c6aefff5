"""The `lowrank` step and the loader that lets every later step read its output.

Only compressor's public plugin API is used: `Step`/`StepConfig`, the `register_steps` and
`load_hf_model` hooks, `compressor.models` helpers and `compressor.errors`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

from pydantic import Field, model_validator

from compressor.models.artifact import Artifact
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.step import PlanContext, Step, StepConfig, StepContext

from compressor_lowrank.factorize import CONFIG_KEY, load_factorized

COMPRESSOR_PLUGIN_API = ">=1.0,<2"

#: The encoder's Linear layers of BERT-style models (attention projections and the FFN).
DEFAULT_TARGETS = ["*.attention.self.query", "*.attention.self.key", "*.attention.self.value",
                   "*.attention.output.dense", "*.intermediate.dense", "*.output.dense"]


class LowRankConfig(StepConfig):
    """Settings of `lowrank`: give `rank` or `energy`."""

    rank: int | None = Field(default=None, ge=1, le=65536, description="Rank kept in every factorized layer.")
    energy: float | None = Field(default=None, gt=0, le=1, description="Keep the smallest rank holding this "
                                                                      "fraction of Σ singular values².")
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1,
                               description="Glob patterns of the Linear modules to factorize (module names).")
    min_features: int = Field(default=128, ge=1, description="Skip Linears whose smaller side is below this.")

    @model_validator(mode="after")
    def _rank_or_energy(self) -> "LowRankConfig":
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        return self


class LowRank(Step):
    """Truncated-SVD factorization of large Linear layers."""

    name = "lowrank"
    summary = "Replace large Linear layers with two smaller ones from a truncated SVD (rank or energy)."
    version = "1"
    Config = LowRankConfig
    accepts = ("hf",)
    produces = "hf"

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """A fixed rank must be below what the model's widths make worthwhile."""
        assert isinstance(config, LowRankConfig)
        hidden = (ctx.model_config or {}).get("hidden_size")
        if config.rank is not None and hidden and config.rank >= hidden:
            raise RecipeError(f"rank {config.rank} is not below the model's hidden size {hidden}, so no layer "
                              "would get smaller", where="with.rank", hint=f"use a rank below {hidden // 2}")

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Factorize every matching Linear where it saves parameters; save with the ranks in config.json."""
        assert isinstance(config, LowRankConfig)
        import torch

        from compressor.models import count_macs_and_params, load_model, save_model
        from compressor_lowrank.factorize import factorize_linear, rank_for, replace_module, saves_parameters

        if artifact.info.quantized:
            raise StepError("lowrank needs float weights; this model is quantized", hint="put lowrank before quantize")
        model = load_model(artifact)
        macs0, params0 = count_macs_and_params(model, artifact.task)
        ranks: dict[str, int] = dict((getattr(model.config, CONFIG_KEY, None) or {}).get("ranks", {}))
        skipped: list[str] = []
        with torch.no_grad():
            for name, module in list(model.named_modules()):
                if not isinstance(module, torch.nn.Linear) or name in ranks:
                    continue
                if not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.targets):
                    continue
                if min(module.in_features, module.out_features) < config.min_features:
                    continue
                s = torch.linalg.svdvals(module.weight.detach().double())
                rank = rank_for(s, config.rank, config.energy)
                if not saves_parameters(module.in_features, module.out_features, rank):
                    skipped.append(name)
                    continue
                replace_module(model, name, factorize_linear(module, rank))
                ranks[name] = rank
        if not ranks:
            raise StepError("no Linear layer matched the targets and got smaller",
                            hint="check with.targets against the model's module names, or lower rank/energy")
        setattr(model.config, CONFIG_KEY, {"ranks": ranks})
        macs1, params1 = count_macs_and_params(model, artifact.task)
        ctx.report(layers_factorized=len(ranks), layers_skipped=len(skipped), params_before=params0,
                   params_after=params1, macs_before=macs0, macs_after=macs1,
                   mean_rank=round(sum(ranks.values()) / len(ranks), 1))
        return save_model(model, artifact, ctx.out_dir)


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `lowrank` step."""
    register(LowRank)


@hookimpl
def load_hf_model(path: str, task: str, config: dict[str, Any]) -> Any | None:
    """Rebuild models that `lowrank` saved (their config.json names the factorized modules)."""
    if CONFIG_KEY not in config:
        return None
    return load_factorized(path, task, config)
