"""The plan: a recipe checked end to end before any heavy work, without loading weights.

Every step exists and its config validates, the format chain is possible, the data each
step needs is there and its labels fit the model, every path exists.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import sys
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from compressor.artifact import TOKENIZER_VOCAB_FILES, Artifact
from compressor.data import TUNE, DataSource, label_ids
from compressor.errors import CompressorError, InputError, PluginLoadError, RecipeError, RecipeErrors
from compressor.host import Host
from compressor.recipe import Recipe, format_loc, load_raw, parse_recipe, validation_errors
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

    @property
    def recipe_dir(self) -> Path:
        """Directory that recipe paths are relative to."""
        return self.recipe_path.parent


def resolve_model_path(spec: str, recipe_dir: Path) -> Path:
    """A model path from the recipe: relative to the recipe, or `pkg:MODULE/SUBDIR` inside an installed package."""
    if spec.startswith("pkg:"):
        module, _, sub = spec[4:].partition("/")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if not found or not found.submodule_search_locations:
            raise InputError(f"no installed Python package {module!r}", where="model.path",
                             hint=f"pip install the package that provides {module!r}")
        return Path(list(found.submodule_search_locations)[0]) / sub
    local = (recipe_dir / Path(spec).expanduser()).resolve()
    if not local.exists() and HUB_ID.fullmatch(spec):
        return resolve_hub_id(spec, local)
    return local


#: `org/name` or `org/name@revision`, as on the Hugging Face Hub (a path that exists locally wins).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]{1,128})?")


def resolve_hub_id(spec: str, local: Path) -> Path:
    """A Hub id resolved the way transformers resolves it: huggingface_hub's snapshot_download, which reads
    its own cache (HF_HOME / HF_HUB_CACHE) and honours HF_HUB_OFFLINE. Only the files compressor reads are
    fetched (config, safetensors weights, tokenizer), never pickles."""
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise InputError(f"{spec!r} is not a local directory, and huggingface_hub is not installed to resolve it "
                         "as a Hub id", where="model.path", hint="pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except LocalEntryNotFoundError:
        raise InputError(f"model directory {local} does not exist, and {spec!r} is not in the Hugging Face cache "
                         "(HF_HUB_OFFLINE is set, or the Hub cannot be reached)", where="model.path",
                         hint="fix the path (relative to the recipe), or download the model first "
                              "(huggingface-cli download ORG/NAME)") from None
    except RepositoryNotFoundError:
        raise InputError(f"model directory {local} does not exist, and {spec!r} is not a model on the Hub",
                         where="model.path", hint="fix the path (relative to the recipe), or check the Hub id"
                         ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputError(f"{spec!r} could not be resolved as a Hub id: {str(exc).splitlines()[0][:200]}",
                         where="model.path", hint="give a local directory, or check the id and the network"
                         ) from None


def check_safetensors(file: Path, where: str) -> None:
    """Read a safetensors file's header (not its tensors): refuse a corrupted or truncated file now,
    rather than when a step loads it minutes later."""
    size = file.stat().st_size
    hint = "the file is damaged: copy or save the model again"
    with open(file, "rb") as fh:
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise InputError(f"{file} is not a valid safetensors file (no readable header)", where=where, hint=hint)
        try:
            header = json.loads(fh.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
            raise InputError(f"{file} is not a valid safetensors file (its header is not valid)", where=where,
                             hint=hint) from None
    if 8 + length + end > size:
        raise InputError(f"{file} is truncated: it holds {size} bytes, its header describes {8 + length + end}",
                         where=where, hint=hint)


def inspect_model(path: Path, task: str, labels: list[str] | None) -> tuple[Artifact, dict[str, Any]]:
    """Describe the input model directory from its files alone (no weights are read)."""
    where = "model.path"
    if not path.exists():
        raise InputError(f"model directory {path} does not exist", where=where,
                         hint="give the directory of a save_pretrained model (relative to the recipe)")
    if not path.is_dir():
        raise InputError(f"{path} is not a directory", where=where, hint="give the model's directory, not a file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} has no config.json", where=where,
                         hint="point to a directory written by transformers' save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_file} is not valid JSON ({exc})", where=where) from None
    if (path / "model.onnx").is_file():
        fmt = "onnx"
    elif any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        fmt = "hf"
    elif any((path / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise InputError(f"{path} holds pickled weights (pytorch_model.bin), which compressor does not load",
                         where=where, hint="re-save the model with save_pretrained(safe_serialization=True)")
    else:
        raise InputError(f"{path} has no model weights (model.safetensors or model.onnx)", where=where,
                         hint="point to a directory written by save_pretrained")
    if fmt == "hf":
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights, where)
    if not any((path / n).is_file() for n in TOKENIZER_VOCAB_FILES):
        raise InputError(f"{path} has no tokenizer (tokenizer.json or vocab.txt)", where=where,
                         hint="save the tokenizer beside the model with tokenizer.save_pretrained(DIR)")
    architectures = config.get("architectures") or []
    from compressor.tasks import task_for

    has_head = task_for(task).has_head(architectures)
    if has_head:
        id2label = config.get("id2label") or {}
        model_labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
        if labels and labels != model_labels:
            raise RecipeError(f"model.labels {labels} differ from the model's own labels {model_labels}",
                              where="model.labels", hint="remove model.labels; the model's head defines them")
    else:
        model_labels = list(labels or [])
    artifact = Artifact(path=path, format=fmt, task=task, labels=model_labels,
                        info={"has_head": has_head, "model_type": config.get("model_type")})
    return artifact, config


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
                              hint="build it with compressor.sweep.build_run, or run it with `compressor run`")
    recipe = parse_recipe(raw)
    recipe_dir = recipe_path.parent
    errors: list[CompressorError] = []

    data: DataSource | None = None
    if recipe.data:
        splits = {s: (recipe_dir / Path(p).expanduser()).resolve()
                  for s, p in (("train", recipe.data.train), ("eval", recipe.data.eval),
                               ("validation", recipe.data.validation)) if p}
        data = DataSource(recipe.data.format, splits, recipe.data.text, recipe.data.label,
                          holdout=recipe.data.holdout, seed=recipe.seed, prompt=recipe.data.prompt,
                          completions=recipe.data.completions, chat_template=recipe.data.chat_template)
        if recipe.data.holdout and not recipe.data.train:
            errors.append(RecipeError("data.holdout holds rows out of data.train, which the recipe does not give",
                                      where="data.holdout", hint="add data.train, or give data.validation"))
        for split, p in splits.items():
            if not p.exists():
                errors.append(InputError(f"{p} does not exist", where=f"data.{split}",
                                         hint="fix the path (paths are relative to the recipe file)"))

    task = host.task(recipe.model.task)  # an unknown task: one message naming the registered ones
    model_path = resolve_model_path(recipe.model.path, recipe_dir)
    if model_path.suffix == ".gguf" and model_path.is_file():
        from compressor.cache import cache_root
        from compressor.gguf_model import convert_gguf

        model_path = convert_gguf(model_path, cache_root(), log=lambda s: print(s, file=sys.stderr))
    source, model_config = inspect_model(model_path, recipe.model.task, recipe.model.labels)
    fmt, labels = source.format, list(source.labels)
    steps: list[PlannedStep] = []
    for i, spec in enumerate(recipe.steps):
        where = format_loc(("steps", i), raw)
        cls = host.steps.get(spec.uses)
        if cls is None:
            err = _unknown_step(spec.uses, host)
            err.where = f"{where}.uses"
            if isinstance(err, PluginLoadError):
                raise err
            errors.append(err)
            continue
        try:
            config = cls.Config.model_validate(spec.with_)
        except ValidationError as exc:
            errors.extend(validation_errors(exc, raw, ("steps", i, "with")))
            fmt = cls.produces if fmt in cls.accepts else fmt  # no cascade of chain errors
            continue
        if fmt not in cls.accepts:
            hint = ("add `- uses: export-onnx` before it" if fmt == "hf" and "onnx" in cls.accepts
                    else f"it accepts {', '.join(cls.accepts)}; reorder the steps")
            wanted = " or ".join(cls.accepts)
            article = "an" if wanted[0] in "aeiou" else "a"
            errors.append(RecipeError(f"needs {article} {wanted} model but the previous step gives {fmt}",
                                      where=where, hint=hint))
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
        ctx = PlanContext(recipe=recipe, recipe_dir=recipe_dir, model_config=model_config, artifact_format=fmt,
                          task=recipe.model.task, labels=labels, data=data,
                          source_path=source.path, earlier=tuple((s.name, s.config) for s in steps))
        reason = cls().supports(config, task, model_config)
        if reason:
            errors.append(RecipeError(f"{spec.uses} does not support this model: {reason}", where=where,
                                      hint="leave the step out, or use a model it supports"))
            steps.append(PlannedStep(i, spec.uses, cls, config, fmt, cls.produces))
            fmt = cls.produces
            continue
        try:
            cls().check(config, ctx)
            config = cls().resolve_config(config, ctx)
            labels = cls().output_labels(config, ctx)
        except CompressorError as exc:
            exc.where = f"{where}.{exc.where}" if exc.where else where
            errors.append(exc)
        steps.append(PlannedStep(i, spec.uses, cls, config, fmt, cls.produces))
        fmt = cls.produces

    if recipe.bundle.formats and fmt not in ("onnx", "ort"):
        errors.append(RecipeError(f"a bundle needs an onnx or ort model but the last step gives {fmt}",
                                  where="bundle.formats", hint="end the steps with export-onnx, or remove bundle"))
    guard = recipe.guard
    split = recipe.evaluate.split
    measures_metrics = data is not None and data.has(split)  # the task's evaluator has rows to score
    if split == "tune" and not measures_metrics:
        errors.append(RecipeError("evaluate.split is tune, and the recipe gives no tuning rows",
                                  where="evaluate.split", hint="add data.validation: PATH or data.holdout: N"))
    elif guard.max_accuracy_drop is not None and not measures_metrics:
        errors.append(RecipeError("max_accuracy_drop needs an accuracy, and without data.eval no evaluator "
                                  "produces one", where="guard.max_accuracy_drop",
                                  hint="add data.eval, or remove the accuracy budget"))
    guard_baseline = _guard_baseline(recipe, steps, errors)
    guard_directions = _guard_metrics(recipe, task, measures_metrics, errors)
    if guard.max_latency_ms is not None and recipe.evaluate.latency is None:
        errors.append(RecipeError("max_latency_ms needs latency, which evaluate.latency: null turns off",
                                  where="guard.max_latency_ms", hint="remove `latency: null` from evaluate"))
    eval_task = _check_eval_task(task, recipe, recipe_dir, errors)
    if data is not None and recipe.data.chat_template and not _has_chat_template(source.path):
        errors.append(InputError(f"data.chat_template is true, and the model's tokenizer in {source.path} has no "
                                 "chat template", where="data.chat_template",
                                 hint="remove chat_template (prompts are then fed as plain text), or use a model "
                                      "whose tokenizer_config.json has one"))
    warnings: list[str] = []
    if not errors and data is not None and task.needs_labels:
        errors.extend(_check_data_labels(data, labels, steps))
    elif not errors and data is not None:
        for split in data.splits:  # a row without its prompt or completion key fails here, not at run time
            try:
                data.load(split)
            except CompressorError as exc:
                errors.append(exc)
    if not errors and data is not None and data.has("train") and any("train" in p.cls().data_splits(p.config)
                                                                      for p in steps):
        n = len(data.load("train"))
        if n < 8:
            warnings.append(f"data.train has only {n} row{'s' if n > 1 else ''}: too few to train or calibrate on")
    if data is None or not data.has(split):
        warnings.append("the recipe has no data.eval: artifacts get size and latency but no accuracy")
    elif split == "tune":
        warnings.append("evaluate.split is tune: the metrics are on the tuning rows, for choosing settings; "
                        "quote figures from a run on data.eval")
    if errors:
        raise RecipeErrors(errors)
    return Plan(recipe=recipe, recipe_path=recipe_path, source=source, data=data, steps=steps, warnings=warnings,
                eval_task=eval_task, guard_baseline=guard_baseline, guard_directions=guard_directions)


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
