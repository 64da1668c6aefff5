"""The recipe: YAML parsed into pydantic models, with `--set` overrides and located errors.

Validation has two phases: the recipe's own structure here, then each step's `with:`
against that step's Config in `compressor.recipe.plan`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from compressor.errors import CompressorError, InputError, RecipeError, RecipeErrors

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(BaseModel):
    """The fine-tuned (or base) model the recipe starts from. Keys beyond these are the task's own (its
    ModelOptions, e.g. sentence-embedding's `pooling`), checked against the task at `check`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    path: str = Field(description="Directory of a transformers save_pretrained model, relative to the recipe; "
                                  "`pkg:MODULE/SUBDIR` names a directory inside an installed Python package.")
    task: str = Field(min_length=1, description="What the model does: a registered task "
                                                "(`compressor plugins` lists them), e.g. text-classification.")
    labels: list[str] | None = Field(default=None, min_length=1,
                                     description="Label names, when the model has no task head yet (finetune adds one).")


class DataSpec(_Strict):
    """Labelled data for training, calibration and evaluation."""

    format: Literal["tsv", "csv", "jsonl", "conll", "datasets", "text"] = Field(
        description="File format (text: plain text, one row per non-blank line, no labels).")
    train: str | None = Field(default=None, description="Training rows (fine-tuning, distillation, calibration).")
    eval: str | None = Field(default=None, description="Evaluation rows (metrics after every step).")
    validation: str | None = Field(default=None, description="Tuning rows: settings are chosen on them (quantize-onnx "
                                                             "mode: auto), never on the eval rows.")
    holdout: int | None = Field(default=None, ge=1, le=1_000_000,
                                description="Without data.validation: hold this many seeded random train rows out "
                                            "as the tuning rows; no step trains or calibrates on them.")
    holdout_from: Literal["rows", "sentences"] = Field(
        default="rows", description="What data.holdout holds out: `rows`, seeded random train rows; `sentences`, "
                                    "seeded whole sentences (rows no other train row contains), with every train "
                                    "row that is a phrase of one of them left out too. For train files that hold "
                                    "the phrases of their sentences (SST-2): tuning rows that look like eval's.")
    text: str | list[str] = Field(default="sentence", description="Column (or key) holding the text or the words; "
                                  "a list of two columns makes each row a pair of texts (sentence similarity).")
    columns: list[str] | None = Field(default=None, min_length=1, description="tsv / csv without a header row: the "
                                      "names of its leading columns, in order (fields past them are ignored).")
    label: str = Field(default="label", description="Column (or key) holding the label or the tags (for a "
                                                    "language model: the completion).")
    prompt: str | None = Field(default=None, description="Language models: an instruction template with {text}; "
                                                        "each row's text becomes a prompt.")
    completions: dict[str, str] | None = Field(default=None, description="Language models: the answer for each "
                                                                         "label, e.g. {'0': negative, '1': positive}.")
    chat_template: bool | None = Field(default=None, description="Language models: wrap prompts in the "
                                       "tokenizer's chat template (default: when it has one; true: it must).")


class StepSpec(_Strict):
    """One step: which plugin step to use and its settings."""

    uses: str = Field(description="Step name, as `compressor steps` lists it.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="The step's Config.")


class LatencySpec(_Strict):
    """How latency is measured."""

    batch_sizes: list[int] = Field(default=[1, 32], min_length=1, description="Batch sizes to time; the first "
                                   "gives p50/p90 latency, the largest gives throughput.")
    runs: int = Field(default=50, ge=1, le=100_000, description="Timed runs per batch size.")
    warmup: int = Field(default=5, ge=0, le=10_000, description="Untimed runs first.")
    threads: int = Field(default=2, ge=1, le=256, description="Intra-op threads for PyTorch and ONNX Runtime.")


class EvaluateSpec(_Strict):
    """What is measured and when."""

    each_step: bool | list[str] = Field(default=True, description="Evaluate every artifact, not only the last; "
                                        "or a list of the artifacts to evaluate besides the last, by name (`input` "
                                        "or a step's name), the others measured for size only.")
    split: Literal["eval", "tune"] = Field(default="eval", description="The rows the task metric is measured on: "
                                           "eval (what reports quote), or tune (the tuning rows, for experiments "
                                           "that choose a setting, so that the choice is not made on eval).")
    max_rows: int | None = Field(default=None, ge=1, description="Evaluate on the first N eval rows only.")
    latency: LatencySpec | None = Field(default_factory=LatencySpec, description="Latency settings; null to skip.")
    task: dict[str, Any] = Field(default_factory=dict, description="Settings of the task's own evaluator (for "
                                 "text-generation: perplexity_file, perplexity_tokens, window, ...; see README).")


class GuardSpec(_Strict):
    """Budgets the final artifact must meet; a broken guard exits 1 (artifacts are kept)."""

    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1000,
                                            description="Largest allowed drop of the task metric from the baseline, "
                                                        "in the metric's units (accuracy 0-1: 0.01 is one point; "
                                                        "Spearman ×100: 1.0 is one point).")
    relative: bool = Field(default=False, description="Read max_accuracy_drop as a fraction of the baseline.")
    baseline: str | StrictInt | None = Field(default=None, description="The artifact max_accuracy_drop and "
                                       "metrics count from: `input`, the name of a step used once in steps, or an "
                                       "artifact's number in the report (0 the input, 1 the first step's output); "
                                       "default: the first artifact measured, normally the input.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Budgets for other metrics the task "
                                      "reports: the largest allowed drop of each, in its own units and direction, "
                                      "from the same baseline (text-generation: `{accuracy: 0.01}` keeps the "
                                      "answers within 1 point while max_accuracy_drop reads perplexity).")
    max_latency_ms: float | None = Field(default=None, gt=0, description="Largest allowed p50 latency at batch 1.")
    max_size_mb: float | None = Field(default=None, gt=0, description="Largest allowed size on disk.")


class BundleSpec(_Strict):
    """The deployable bundle made from the last artifact."""

    formats: list[str] = Field(default_factory=list, description="Bundle formats to write, each a registered format "
                               "that ONNX Runtime runs: onnx → bundle/, any other (ort) → bundle-FORMAT/, converted "
                               "from the final onnx model when its format says how (checked at `check`).")
    tar: bool = Field(default=False, description="Also write each bundle as a .tar.gz beside it.")


class Recipe(_Strict):
    """A compression recipe."""

    version: Literal[1] = Field(description="Recipe schema version.")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="Run name (the run directory's).")
    model: ModelSpec
    data: DataSpec | None = None
    steps: list[StepSpec] = Field(min_length=1, description="The chain of steps, run in order.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    guard: GuardSpec = Field(default_factory=GuardSpec)
    bundle: BundleSpec = Field(default_factory=BundleSpec)
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed for every random choice.")
    threads: int | None = Field(default=None, ge=1, le=1024,
                                description="Threads for the steps' work (training, calibration, searches); "
                                            "default: every CPU this process may use. Latency is measured with "
                                            "evaluate.latency.threads, a separate setting.")
    matrix: dict[str, list[Any]] | None = Field(
        default=None, description="A sweep: names mapped to lists of values; `${{ matrix.NAME }}` anywhere in the "
                                  "recipe takes each value in turn, and every combination runs as a variant.")
    select: Literal["smallest", "fastest", "most_accurate"] | None = Field(
        default=None, description="With a matrix: the variant to keep (and bundle) among those passing the guard.")

    def digest(self) -> str:
        """sha256 of the resolved recipe (canonical JSON)."""
        return hashlib.sha256(json.dumps(self.model_dump(by_alias=True), sort_keys=True).encode()).hexdigest()


def format_loc(loc: tuple[Any, ...], raw: Any) -> str:
    """`('steps', 2, 'with', 'ratio')` → `steps[2] (prune).with.ratio`, using the raw recipe for names."""
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("uses"), str) and out.startswith("steps"):
                out += f" ({node['uses']})"
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "recipe"


def validation_errors(exc: ValidationError, raw: Any, prefix: tuple[Any, ...] = ()) -> list[CompressorError]:
    """One RecipeError per pydantic error, each naming its location."""
    errors: list[CompressorError] = []
    for err in exc.errors():
        loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        kind = err["type"]
        if kind == "extra_forbidden":
            msg, hint = "unknown key", "remove it, or check its spelling against `compressor schema`"
        elif kind == "missing":
            msg, hint = "is required", None
        else:
            msg, hint = err["msg"], None
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        errors.append(RecipeError(msg, where=format_loc(loc, raw), hint=hint))
    return errors


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (YAML would silently keep the last one) and
    documents with many aliases (a 'billion laughs' document expands exponentially)."""

    MAX_ALIASES = 100

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {self.MAX_ALIASES} aliases (*name); "
                                                  "write the values out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """Parse YAML with RecipeLoader."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`steps.1.with.ratio=0.3` → (['steps', 1, 'with', 'ratio'], 0.3), values parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r} has no '='", hint="write --set KEY.PATH=VALUE, e.g. steps.1.with.ratio=0.3")
    key, _, value = text.partition("=")
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    if not key.strip() or any(p == "" for p in parts):
        raise RecipeError(f"--set {text!r} has an empty key", hint="write --set KEY.PATH=VALUE")
    try:
        parsed = safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_override(raw: Any, path: list[str | int], value: Any, text: str) -> None:
    """Set one value inside the raw recipe, creating mappings on the way."""
    node = raw
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(str(p) for p in path[: i + 1])
        if isinstance(node, list):
            if not isinstance(part, int) or not -len(node) <= part < len(node):
                raise RecipeError(f"--set {text!r}: index {part!r} is not in a list of {len(node)}", where=where)
            if last:
                node[part] = value
            else:
                node = node[part]
        elif isinstance(node, dict):
            key = str(part)
            if last:
                node[key] = value
            else:
                if not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
        else:
            raise RecipeError(f"--set {text!r}: {where} is not a mapping or a list", where=where)


def load_raw(path: Path, overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Read the YAML recipe and apply overrides; errors point at the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file",
                         hint="give the path of a recipe YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError("the recipe is not UTF-8 text", where=str(path)) from None
    try:
        raw = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"not valid YAML: {problem}", where=where, hint="fix the YAML syntax at that line") from None
    except RecursionError:
        raise RecipeError("the YAML nests too deeply", where=str(path)) from None
    if raw is None:
        raise RecipeError("the recipe is empty", where=str(path), hint="see recipes/ for a complete example")
    if not isinstance(raw, dict):
        raise RecipeError(f"the recipe must be a mapping, not a {type(raw).__name__}", where=str(path),
                          hint="start with `version: 1`, `name:`, `model:` and `steps:` at the top level")
    for text_ in overrides:
        key, value = parse_override(text_)
        apply_override(raw, key, value, text_)
    return raw


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate the recipe's own structure (phase one)."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeErrors(validation_errors(exc, raw)) from None
