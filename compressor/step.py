"""The Step contract: what a plugin implements to contribute one compression or export step.

A step is a class with a name, a one-line summary, a pydantic `Config`, the formats it
accepts and the one it produces, the data it needs, and `run(artifact, config, ctx)`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from compressor.models.formats import HF

if TYPE_CHECKING:
    from compressor.models.artifact import Artifact
    from compressor.models.data import DataSource
    from compressor.recipe.schema import Recipe

log = logging.getLogger("compressor")


class StepConfig(BaseModel):
    """Base class of every step's `Config`: unknown keys are errors, values are validated."""

    # defer_build: each Config's validator is built on first use, not at import (keeps `--help` fast)
    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True)


@dataclass
class PlanContext:
    """What a step may look at while the plan is checked: no weights are loaded."""

    recipe: "Recipe"
    recipe_dir: Path
    model_config: dict[str, Any]
    artifact_format: str
    task: str
    labels: list[str]
    data: "DataSource | None" = None
    #: Directory of the recipe's input model (its tokenizer and files; no weights are read).
    source_path: Path | None = None
    #: (uses, validated config) of the steps before this one, in order: for checks that depend on the chain.
    earlier: tuple[tuple[str, "StepConfig"], ...] = ()

    def after(self, *names: str) -> str | None:
        """The first earlier step whose `uses` is one of `names`, located as `steps[i] (name)`; else None."""
        return next((f"steps[{i}] ({uses})" for i, (uses, _) in enumerate(self.earlier) if uses in names), None)

    def resolve(self, path: str | Path) -> Path:
        """A path from the recipe, relative to the recipe file's directory."""
        return (self.recipe_dir / Path(path).expanduser()).resolve()


@dataclass
class StepContext:
    """What a running step gets besides its input artifact and config."""

    out_dir: Path
    data: "DataSource"
    source: "Artifact"
    seed: int
    threads: int
    recipe_dir: Path
    notes: dict[str, Any] = field(default_factory=dict)
    #: (step name, artifact) of the input and of every step so far, oldest first.
    history: list[tuple[str, "Artifact"]] = field(default_factory=list)
    #: The checked recipe (its evaluate: and guard: settings), when the step runs inside a recipe.
    recipe: "Recipe | None" = None
    #: Writes one line to the run's log (stderr for the CLI).
    log: Callable[[str], None] = field(default=lambda line: None, repr=False)

    def resolve(self, path: str | Path) -> Path:
        """A path from the recipe, relative to the recipe file's directory."""
        return (self.recipe_dir / Path(path).expanduser()).resolve()

    def report(self, **values: Any) -> None:
        """Record figures about the step (parameters trained, rows kept, …) in the run record."""
        self.notes.update(values)

    def seed_everything(self) -> None:
        """Seed Python, numpy and torch with the run's seed."""
        import numpy as np
        import torch

        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)


class Step:
    """Base class of a step. Subclasses set the class attributes and implement `run`."""

    #: Unique name used in recipes (`uses: NAME`).
    name: ClassVar[str]
    #: One line shown by `compressor steps`.
    summary: ClassVar[str]
    #: Bump when the output for the same input and config changes; part of the cache key.
    version: ClassVar[str] = "1"
    #: The pydantic model validating the recipe's `with:` mapping.
    Config: ClassVar[type[StepConfig]] = StepConfig
    #: Artifact formats this step can read.
    accepts: ClassVar[tuple[str, ...]] = (HF,)
    #: The artifact format this step writes.
    produces: ClassVar[str] = HF
    #: Data splits the step reads (`train`, `eval`); the plan checks the recipe provides them.
    needs_data: ClassVar[tuple[str, ...]] = ()
    #: Importable modules the step needs beyond compressor's own dependencies.
    requires: ClassVar[tuple[str, ...]] = ()
    #: False when the output depends on thread timing; the record says so.
    deterministic: ClassVar[bool] = True
    #: Config fields that name a file the step reads (resolved by `resolve_config`): the cache is keyed on the
    #: file's content, so an edited file under the same name is not served from the cache.
    content_fields: ClassVar[tuple[str, ...]] = ()
    #: Notes (keys given to ctx.report) that `report_sections` renders: the report's steps table leaves them out.
    section_notes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def report_sections(cls, step: dict[str, Any]) -> list[str]:
        """Markdown lines this step adds to the run's report after the steps table (report.html shows them
        too), from its entry in record.json (`step["notes"]` holds what it reported); none by default."""
        return []

    @classmethod
    def bundle_facts(cls, notes: dict[str, Any]) -> dict[str, Any]:
        """Keys this step adds to a bundle's manifest.json from what it reported (say, the CPU its settings
        were chosen on); none by default."""
        return {}

    def cache_extra(self, config: StepConfig) -> Any:
        """Anything besides the config that decides the output (e.g. the CPU's instruction set); keys the cache.
        The default: the content hash of each `content_fields` file that exists, or None."""
        from compressor.models.artifact import hash_file

        files = {name: Path(value) for name in self.content_fields if (value := getattr(config, name, None))}
        return {name: hash_file(path) for name, path in files.items() if path.is_file()} or None

    def data_splits(self, config: StepConfig) -> tuple[str, ...]:
        """Data splits this configuration reads (default: `needs_data`); part of the plan check and cache key."""
        return self.needs_data

    def supports(self, config: StepConfig, task: Any, model_config: dict[str, Any]) -> str | None:
        """Why this step cannot run on this task (a compressor.tasks.Task) or architecture (the model's
        config.json), or None when it can. `check` refuses the recipe with the reason (exit 2)."""
        return None

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """Plan-time checks that need the recipe or the model's config (raise RecipeError)."""

    def resolve_config(self, config: StepConfig, ctx: PlanContext) -> StepConfig:
        """The config with defaults that depend on the recipe filled in (after `check`); what runs, what
        keys the cache and what the record shows. Default: the config unchanged."""
        return config

    def output_labels(self, config: StepConfig, ctx: PlanContext) -> list[str]:
        """Labels of the artifact this step writes (default: those of its input)."""
        return ctx.labels

    def run(self, artifact: "Artifact", config: StepConfig, ctx: StepContext) -> "Artifact":
        """Read `artifact`, write the result into `ctx.out_dir`, return the new artifact."""
        raise NotImplementedError
