"""The plan: a recipe checked end to end before any heavy work, without loading weights.

Every step exists and its config validates, the format chain is possible, the data each
step needs is there and its labels fit the model, every path exists.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compressor.models.artifact import Artifact
from compressor.models.data import TUNE, DataSource, label_ids
from compressor.models.formats import HF, ONNX, bundle_format_errors
from compressor.errors import CompressorError, InputError, PluginLoadError, RecipeError, RecipeErrors
from compressor.host import Host
from compressor.recipe.model_input import inspect_model, resolve_model_path
from compressor.recipe.schema import Recipe, format_loc, load_raw, parse_recipe, validation_errors
from compressor.step import PlanContext, Step, StepConfig

@dataclass
class PlannedStep:
    """One resolved step of the plan."""

    index: int
    name: str
    cls: type[Step]
    config: StepConfig
    input_format: str
    output_format: str

    @property
    def label(self) -> str:
        """`steps[1] (export-onnx)`, as errors name it."""
        return f"steps[{self.index}] ({self.name})"


@dataclass
class Plan:
    """A checked recipe, ready to run."""

    recipe: Recipe
    recipe_path: Path
    source: Artifact
    data: DataSource | None
    steps: list[PlannedStep]
    warnings: list[str] = field(default_factory=list)
    #: evaluate.task validated by the task's EvalConfig, paths made absolute (what its evaluator reads)
    eval_task: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None
    matrix_values: dict[str, Any] | None = None
    #: guard.baseline as an artifact number (0: the input); None: the first artifact measured
    guard_baseline: int | None = None
    #: the direction of each metric in guard.metrics (True: higher is better)
    guard_directions: dict[str, bool] = field(default_factory=dict)

    def evaluates(self, index: int) -> bool:
        """Whether artifact `index` (0: the input) gets the task metric and latency, not only its size: every one
        with evaluate.each_step true, the named ones with a list, and the last always."""
        each = self.recipe.evaluate.each_step
        if each is True or index == len(self.steps):
            return True
        if each is False:
            return False
        return (["input"] + [s.name for s in self.steps])[index] in each

    @property
    def measures_first_for_baseline(self) -> bool:
        """evaluate.each_step false with a guard that needs a baseline: the input, or failing that the first
        artifact that can be measured, is measured as the guard's default baseline."""
        return self.recipe.evaluate.each_step is False and self.guard_needs_baseline

    @property
    def guard_needs_baseline(self) -> bool:
        """Whether the guard compares the final metric with a baseline's (max_accuracy_drop), so that the first
        artifact that can be measured always is."""
        return self.recipe.guard.max_accuracy_drop is not None

    @property
    def recipe_dir(self) -> Path:
        """Directory that recipe paths are relative to."""
        return self.recipe_path.parent


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "`compressor steps` lists the steps: " + ", ".join(sorted(choices))


def _unknown_step(name: str, host: Host) -> CompressorError:
    broken = host.broken
    if broken:
        names = ", ".join(f"{p.name} ({p.error})" for p in broken)
        return PluginLoadError(f"unknown step {name!r}; plugin(s) that failed to load may provide it: {names}",
                               hint="fix or reinstall the plugin; --disable-plugin NAME silences one")
    return RecipeError(f"unknown step {name!r}", hint=_suggest(name, list(host.steps)))


def build_plan(recipe_path: Path, host: Host, overrides: tuple[str, ...] | list[str] = (),
               raw: dict[str, Any] | None = None) -> Plan:
    """Parse and check a recipe (or, with `raw`, one variant of a sweep already read from it);
    raise RecipeErrors (exit 2) or PluginLoadError (exit 3)."""
    recipe_path = Path(recipe_path).resolve()
    if raw is None:
        raw = load_raw(recipe_path, overrides)
        if "matrix" in raw or "select" in raw:
            raise RecipeError("the recipe is a sweep (it has matrix: or select:)", where="matrix",
                              hint="build it with compressor.recipe.sweep.build_run, or run it with `compressor run`")
    recipe = parse_recipe(raw)
    recipe_dir = recipe_path.parent
    errors: list[CompressorError] = []
    data = _plan_data(recipe, recipe_dir, errors)
    task = host.task(recipe.model.task)  # an unknown task: one message naming the registered ones
    model_path = resolve_model_path(recipe.model.path, recipe_dir)
    from compressor.run.cache import cache_root

    converted = host.pm.hook.convert_input_model(path=str(model_path), cache_dir=str(cache_root()),
                                                 log=lambda s: print(s, file=sys.stderr))
    model_path = Path(converted) if converted else model_path
    model_path = task.prepare_model(model_path, _model_options(recipe, raw, task), cache_root(),
                                    lambda s: print(s, file=sys.stderr))
    source, model_config = inspect_model(model_path, recipe.model.task, recipe.model.labels)
    chain = _Chain(source.format, list(source.labels))
    steps: list[PlannedStep] = []
    for i, spec in enumerate(recipe.steps):
        ctx = PlanContext(recipe=recipe, recipe_dir=recipe_dir, model_config=model_config,
                          artifact_format=chain.format, task=recipe.model.task, labels=chain.labels, data=data,
                          source_path=source.path, earlier=tuple((s.name, s.config) for s in steps))
        planned = _plan_step(i, spec, raw, host, task, ctx, chain, errors)
        if planned is not None:
            steps.append(planned)
    errors += bundle_format_errors(recipe.bundle.formats, chain.format, "the last step")
    measures_metrics = _check_evaluation(recipe, data, errors)
    if isinstance(recipe.evaluate.each_step, list):
        known = ["input"] + [spec.uses for spec in recipe.steps]
        for name in recipe.evaluate.each_step:
            if name not in known:
                errors.append(RecipeError(f"evaluate.each_step names {name!r}, which is neither `input` nor a step "
                                          f"of this recipe (steps: {', '.join(known[1:])})",
                                          where="evaluate.each_step", hint="list `input` or steps' names"))
    guard_baseline = _guard_baseline(recipe, steps, errors)
    guard_directions = _guard_metrics(recipe, task, measures_metrics, errors)
    errors += _budgets_within_range(recipe, task)
    eval_task = _check_eval_task(task, recipe, recipe_dir, errors)
    if data is not None and recipe.data.chat_template and not _has_chat_template(source.path):
        errors.append(InputError(f"data.chat_template is true, and the model's tokenizer in {source.path} has no "
                                 "chat template", where="data.chat_template",
                                 hint="remove chat_template (prompts are then fed as plain text), or use a model "
                                      "whose tokenizer_config.json has one"))
    if not errors and data is not None:
        _check_rows(data, task, chain.labels, steps, errors)
    if errors:
        raise RecipeErrors(errors)
    return Plan(recipe=recipe, recipe_path=recipe_path, source=source, data=data, steps=steps,
                warnings=_data_warnings(recipe, data, steps), eval_task=eval_task, guard_baseline=guard_baseline,
                guard_directions=guard_directions)


@dataclass
class _Chain:
    """What the steps checked so far hand to the next one: the artifact's format and labels."""

    format: str
    labels: list[str]


def _model_options(recipe: Recipe, raw: dict[str, Any], task: Any) -> Any:
    """The task's own keys of `model:` (beyond path, task, labels), checked against its ModelOptions; RecipeErrors
    naming each wrong key."""
    given = dict(recipe.model.model_extra or {})
    schema = task.ModelOptions
    if schema is None:
        if given:
            raise RecipeErrors([RecipeError("unknown key", where=f"model.{k}", hint=f"{task.name} models take no "
                                            f"model.{k}; check its spelling against `compressor schema`")
                                for k in given])
        return None
    try:
        return schema.model_validate(given)
    except ValidationError as exc:
        raise RecipeErrors(validation_errors(exc, raw, ("model",))) from None


def _plan_data(recipe: Recipe, recipe_dir: Path, errors: list[CompressorError]) -> DataSource | None:
    """The recipe's data source (None without `data:`), its missing files and holdout added to `errors`."""
    if not recipe.data:
        return None
    splits = {s: (recipe_dir / Path(p).expanduser()).resolve()
              for s, p in (("train", recipe.data.train), ("eval", recipe.data.eval),
                           ("validation", recipe.data.validation)) if p}
    data = DataSource(recipe.data.format, splits, recipe.data.text, recipe.data.label,
                      holdout=recipe.data.holdout, seed=recipe.seed, holdout_from=recipe.data.holdout_from,
                      prompt=recipe.data.prompt,
                      completions=recipe.data.completions, chat_template=recipe.data.chat_template,
                      columns=recipe.data.columns)
    if recipe.data.columns and recipe.data.format not in ("tsv", "csv"):
        errors.append(RecipeError(f"data.columns names the columns of a headerless tsv or csv file, and data.format "
                                  f"is {recipe.data.format}", where="data.columns", hint="remove data.columns"))
    if isinstance(recipe.data.text, list) and (recipe.data.format not in ("tsv", "csv", "jsonl")
                                               or len(recipe.data.text) != 2):
        errors.append(RecipeError("a list data.text names the two columns of a pair of texts, in a tsv, csv or jsonl "
                                  f"file (got {len(recipe.data.text)} in a {recipe.data.format} file)",
                                  where="data.text", hint="give one column, or two for pairs"))
    if recipe.data.holdout and not recipe.data.train:
        errors.append(RecipeError("data.holdout holds rows out of data.train, which the recipe does not give",
                                  where="data.holdout", hint="add data.train, or give data.validation"))
    if recipe.data.holdout_from == "sentences" and (not recipe.data.holdout or "validation" in splits
                                                    or isinstance(recipe.data.text, list)
                                                    or recipe.data.format in ("conll", "datasets")):
        errors.append(RecipeError("data.holdout_from: sentences holds whole sentences out of the rows of one text "
                                  "column: it needs data.holdout, no data.validation, one data.text column, and "
                                  "a tsv, csv, jsonl or text file", where="data.holdout_from",
                                  hint="remove holdout_from, or give data.holdout: N with a one-column train file"))
    for split, p in splits.items():
        if not p.exists():
            errors.append(InputError(f"{p} does not exist", where=f"data.{split}",
                                     hint="fix the path (paths are relative to the recipe file)"))
    return data


def _plan_step(i: int, spec: Any, raw: dict[str, Any], host: Host, task: Any, ctx: PlanContext, chain: _Chain,
               errors: list[CompressorError]) -> PlannedStep | None:
    """Check steps[i] against the chain so far (its config, format, data, packages, model support, own check);
    add what is wrong to `errors`, advance `chain`, and return the planned step (None when it is unknown or
    its config is invalid)."""
    where = format_loc(("steps", i), raw)
    cls = host.steps.get(spec.uses)
    if cls is None:
        err = _unknown_step(spec.uses, host)
        err.where = f"{where}.uses"
        if isinstance(err, PluginLoadError):
            raise err
        errors.append(err)
        return None
    fmt = chain.format
    try:
        config = cls.Config.model_validate(spec.with_)
    except ValidationError as exc:
        errors.extend(validation_errors(exc, raw, ("steps", i, "with")))
        chain.format = cls.produces if fmt in cls.accepts else fmt  # no cascade of chain errors
        return None
    if fmt not in cls.accepts:
        hint = ("add `- uses: export-onnx` before it" if fmt == HF and ONNX in cls.accepts
                else f"it accepts {', '.join(cls.accepts)}; reorder the steps")
        wanted = " or ".join(cls.accepts)
        article = "an" if wanted[0] in "aeiou" else "a"
        errors.append(RecipeError(f"needs {article} {wanted} model but the previous step gives {fmt}",
                                  where=where, hint=hint))
    errors.extend(_step_needs(cls, config, ctx.data, where))
    chain.format = cls.produces
    reason = cls().supports(config, task, ctx.model_config)
    if reason:
        errors.append(RecipeError(f"{spec.uses} does not support this model: {reason}", where=where,
                                  hint="leave the step out, or use a model it supports"))
        return PlannedStep(i, spec.uses, cls, config, fmt, cls.produces)
    try:
        cls().check(config, ctx)
        config = cls().resolve_config(config, ctx)
        chain.labels = cls().output_labels(config, ctx)
    except CompressorError as exc:
        exc.where = f"{where}.{exc.where}" if exc.where else where
        errors.append(exc)
    return PlannedStep(i, spec.uses, cls, config, fmt, cls.produces)


def _step_needs(cls: type[Step], config: StepConfig, data: DataSource | None, where: str) -> list[CompressorError]:
    """What a step needs and the recipe does not give: data splits (tuning rows among them) and packages."""
    errors: list[CompressorError] = []
    for split in cls().data_splits(config):
        if (data is None or not data.has(split)) and split == TUNE:
            errors.append(RecipeError("needs tuning rows to choose its settings on, and the recipe gives none",
                                      where=where, hint="add data.validation: PATH, or data.holdout: N to hold "
                                                        "N train rows out of every other step"))
        elif data is None or not data.has(split):
            errors.append(RecipeError(f"needs {split} data and the recipe gives none", where=where,
                                      hint=f"add data.{split}: PATH to the recipe"))
    for module in cls.requires:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            errors.append(InputError(f"needs the Python package {module!r}, which is not installed",
                                     where=where, hint=f"pip install {module}"))
    return errors


def _check_evaluation(recipe: Recipe, data: DataSource | None, errors: list[CompressorError]) -> bool:
    """The evaluate and guard settings against the data; returns whether the task's metrics get measured."""
    guard, split = recipe.guard, recipe.evaluate.split
    measures_metrics = data is not None and data.has(split)  # the task's evaluator has rows to score
    if split == "tune" and not measures_metrics:
        errors.append(RecipeError("evaluate.split is tune, and the recipe gives no tuning rows",
                                  where="evaluate.split", hint="add data.validation: PATH or data.holdout: N"))
    elif guard.max_accuracy_drop is not None and not measures_metrics:
        errors.append(RecipeError("max_accuracy_drop needs an accuracy, and without data.eval no evaluator "
                                  "produces one", where="guard.max_accuracy_drop",
                                  hint="add data.eval, or remove the accuracy budget"))
    if guard.max_latency_ms is not None and recipe.evaluate.latency is None:
        errors.append(RecipeError("max_latency_ms needs latency, which evaluate.latency: null turns off",
                                  where="guard.max_latency_ms", hint="remove `latency: null` from evaluate"))
    return measures_metrics


def _check_rows(data: DataSource, task: Any, labels: list[str], steps: list[PlannedStep],
                errors: list[CompressorError]) -> None:
    """Read every split once: labels the model does not know, or a row without its prompt or completion key,
    fail here and not at run time."""
    if task.needs_labels:
        errors.extend(_check_data_labels(data, labels, steps))
        return
    for split in data.splits:
        try:
            task.check_rows(data.load(split), data.splits[split], f"data.{split}")
        except CompressorError as exc:
            errors.append(exc)


def _data_warnings(recipe: Recipe, data: DataSource | None, steps: list[PlannedStep]) -> list[str]:
    """What `check` prints without failing: too few train rows, no eval data, figures on tuning rows."""
    warnings: list[str] = []
    split = recipe.evaluate.split
    if data is not None and data.has("train") and any("train" in p.cls().data_splits(p.config) for p in steps):
        n = len(data.load("train"))
        if n < 8:
            warnings.append(f"data.train has only {n} row{'s' if n > 1 else ''}: too few to train or calibrate on")
    if data is None or not data.has(split):
        warnings.append("the recipe has no data.eval: artifacts get size and latency but no accuracy")
    elif split == "tune":
        warnings.append("evaluate.split is tune: the metrics are on the tuning rows, for choosing settings; "
                        "quote figures from a run on data.eval")
    return warnings


def _guard_metrics(recipe: Recipe, task: Any, measures_metrics: bool, errors: list[CompressorError]
                   ) -> dict[str, bool]:
    """guard.metrics: each a metric the task reports, on rows its evaluator has (`measures_metrics`); their
    directions."""
    directions: dict[str, bool] = {}
    known = {m.name: m.higher_is_better for m in task.metrics}
    for name, budget in recipe.guard.metrics.items():
        where = f"guard.metrics.{name}"
        if name not in known:
            errors.append(RecipeError(f"{task.name} models report no metric {name!r} (they report "
                                      f"{', '.join(known)})", where=where, hint=f"use one of {', '.join(known)}"))
        elif budget < 0:
            errors.append(RecipeError(f"the budget of {name} is negative ({budget})", where=where,
                                      hint="give the largest allowed drop, 0 or more"))
        elif not measures_metrics:
            errors.append(RecipeError(f"guard.metrics.{name} needs {name}, and without data.eval no evaluator "
                                      "produces it", where=where, hint="add data.eval, or remove the budget"))
        else:
            directions[name] = known[name]
    return directions


def _budgets_within_range(recipe: Recipe, task: Any) -> list[CompressorError]:
    """Absolute budgets larger than their metric's whole range (max_accuracy_drop 5 for an accuracy of 0 to 1):
    a budget in the wrong units."""
    guard = recipe.guard
    budgets = [("guard.max_accuracy_drop", task.metric, guard.max_accuracy_drop)] if not guard.relative else []
    budgets += [(f"guard.metrics.{name}", task.metric_named(name), value) for name, value in guard.metrics.items()]
    return [RecipeError(f"a drop of {value:g} is more than {metric.name} can drop (it is at most {metric.top:g})",
                        where=where, hint=f"give the budget in {metric.name}'s units"
                                          + (" (0.01 is one point)" if metric.top == 1 else ""))
            for where, metric, value in budgets if value is not None and metric.top is not None and value > metric.top]


def _guard_baseline(recipe: Recipe, steps: list[PlannedStep], errors: list[CompressorError]) -> int | None:
    """guard.baseline as the number of an artifact the run measures (0: the input), or None (the first measured)."""
    spec = recipe.guard.baseline
    if spec is None:
        return None
    names = [s.name for s in steps]
    where = "guard.baseline"
    if recipe.guard.max_accuracy_drop is None and not recipe.guard.metrics:
        errors.append(RecipeError("guard.baseline is the reference of max_accuracy_drop and guard.metrics, and "
                                  "neither is set", where=where, hint="add a budget, or remove baseline"))
        return None
    if isinstance(spec, int):
        if not 0 <= spec <= len(steps):
            errors.append(RecipeError(f"guard.baseline {spec} is not an artifact of this run (0 to {len(steps)})",
                                      where=where, hint="give 0 for the input or a step's number, 1-based"))
            return None
        index = spec
    elif spec == "input":
        index = 0
    elif names.count(spec) == 1:
        index = names.index(spec) + 1
    else:
        problem = "is used more than once" if spec in names else "is not a step of this recipe"
        errors.append(RecipeError(f"guard.baseline {spec!r} {problem} (steps: {', '.join(names)})", where=where,
                                  hint="give `input`, a step used once, or the artifact's number"))
        return None
    if not recipe.evaluate.each_step and index not in (0, len(steps)):  # the input is measured all the same
        errors.append(RecipeError("guard.baseline names an artifact that evaluate.each_step: false does not measure",
                                  where=where, hint="remove `each_step: false` from evaluate, or the baseline"))
        return None
    each = recipe.evaluate.each_step
    if isinstance(each, list) and index != len(steps) and (["input"] + names)[index] not in each:
        errors.append(RecipeError(f"guard.baseline names artifact {index}, which evaluate.each_step does not list",
                                  where=where, hint=f"add {(['input'] + names)[index]!r} to evaluate.each_step"))
        return None
    return index


def _has_chat_template(path: Path) -> bool:
    """Whether a model directory's tokenizer carries a chat template."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except ValueError:
        return False


def _check_eval_task(task: Any, recipe: Recipe, recipe_dir: Path, errors: list[CompressorError]) -> dict[str, Any]:
    """evaluate.task against the task's EvalConfig; its `*_file` paths made absolute and checked."""
    given = recipe.evaluate.task
    schema = getattr(task, "EvalConfig", None)
    if schema is None:
        if given:
            errors.append(RecipeError(f"task {task.name!r} takes no evaluate.task settings", where="evaluate.task",
                                      hint="remove evaluate.task"))
        return {}
    try:
        config = schema.model_validate(given).model_dump()
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            errors.append(RecipeError(err["msg"], where=f"evaluate.task.{loc}" if loc else "evaluate.task"))
        return {}
    for key, value in list(config.items()):
        if key.endswith("_file") and value:
            path = (recipe_dir / Path(value).expanduser()).resolve()
            if not path.is_file():
                errors.append(InputError(f"{path} does not exist", where=f"evaluate.task.{key}",
                                         hint="fix the path (relative to the recipe file)"))
            config[key] = str(path)
    return config


def _check_data_labels(data: DataSource, labels: list[str], steps: list[PlannedStep]) -> list[CompressorError]:
    """Every split's labels must be labels of the model (once the model's labels are known)."""
    errors: list[CompressorError] = []
    for split in data.splits:
        try:
            found = data.label_set(split)
            if labels:
                label_ids(labels, found)
        except InputError as exc:
            exc.where = f"data.{split}"
            errors.append(exc)
    return errors
