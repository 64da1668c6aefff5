"""Sweeps: a recipe with a `matrix:` runs once per combination of its values.

`${{ matrix.NAME }}` anywhere in the recipe takes each value in turn (a whole-string reference keeps
the value's type: `ratio: ${{ matrix.ratio }}` gives a float). Each variant is an ordinary recipe
and an ordinary run, under `RUN_DIR/variants/NAME/`; variants that share a prefix of steps share
its cached artifacts, because the cache is keyed by content. `select:` keeps the smallest (or
fastest, or most accurate) variant that passes the guard, and the bundle is made from it.

Variants run one after another, in local processes (`--jobs N`), or as Ray tasks
(`--executor ray`); every executor runs the same `run_variant`, so results are the same.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compressor.run.cache import write_json_atomic
from compressor.errors import CompressorError, GuardFailed, InputError, RecipeError, RecipeErrors
from compressor.host import Host
from compressor.models.formats import bundle_format_errors
from compressor.recipe.plan import Plan, build_plan
from compressor.recipe.schema import BundleSpec, format_loc, load_raw

MATRIX_REF = re.compile(r"\$\{\{\s*matrix\.([^\s}]*)\s*\}\}")
MAX_VARIANTS = 256
SELECT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "smallest": lambda a: a["size_bytes"],
    "fastest": lambda a: (a.get("latency") or {}).get("p50_ms") or float("inf"),
    # the best metric first, whichever way it is better (accuracy up, perplexity down)
    "most_accurate": lambda a: ((-1 if a.get("higher_is_better", True) else 1) * a[a["metric"]]
                                if a.get("metric") and a.get(a["metric"]) is not None else float("inf")),
}


@dataclass
class Variant:
    """One combination of the matrix: its name, values, recipe and checked plan."""

    name: str
    values: dict[str, Any]
    raw: dict[str, Any]
    plan: Plan


@dataclass
class Sweep:
    """A checked sweep: every variant's plan, and how to pick the one to keep."""

    recipe_path: Path
    name: str
    variants: list[Variant]
    select: str
    bundle: dict[str, Any] = field(default_factory=dict)


def _refs(node: Any, path: tuple[Any, ...], found: list[tuple[str, tuple[Any, ...]]]) -> None:
    if isinstance(node, str):
        found.extend((m.group(1), path) for m in MATRIX_REF.finditer(node))
    elif isinstance(node, dict):
        for k, v in node.items():
            _refs(v, path + (k,), found)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refs(v, path + (i,), found)


def substitute(node: Any, values: dict[str, Any]) -> Any:
    """The node with every `${{ matrix.NAME }}` replaced (a whole-string reference keeps the value's type)."""
    if isinstance(node, str):
        whole = MATRIX_REF.fullmatch(node.strip())
        if whole:
            return copy.deepcopy(values[whole.group(1)])
        return MATRIX_REF.sub(lambda m: str(values[m.group(1)]), node)
    if isinstance(node, dict):
        return {k: substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values) for v in node]
    return node


def variant_name(values: dict[str, Any]) -> str:
    """`ratio=0.3, mode=int4` → `ratio-0.3_mode-int4` (safe as a directory name)."""
    text = "_".join(f"{k}-{json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:120] or "variant"


def expand(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, values, recipe) for every combination of the matrix; RecipeErrors for a bad matrix."""
    matrix = raw.get("matrix")
    if not isinstance(matrix, dict) or not matrix:
        raise RecipeError("the matrix is empty", where="matrix",
                          hint="map names to lists of values, e.g. matrix: {ratio: [0.3, 0.5]}")
    errors: list[CompressorError] = []
    for name, values in matrix.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            errors.append(RecipeError(f"{name!r} is not a usable matrix name", where="matrix",
                                      hint="use letters, digits, _ and -"))
        elif not isinstance(values, list) or not values:
            errors.append(RecipeError("needs a non-empty list of values", where=f"matrix.{name}"))
    body = {k: v for k, v in raw.items() if k not in ("matrix", "select")}
    found: list[tuple[str, tuple[Any, ...]]] = []
    _refs(body, (), found)
    used = {name for name, _ in found}
    for name, path in found:
        if name not in matrix:
            errors.append(RecipeError(f"`${{{{ matrix.{name} }}}}` names no matrix entry "
                                      f"(the matrix has {', '.join(map(str, matrix)) or 'none'})",
                                      where=format_loc(path, body)))
    for name in matrix:
        if name not in used:
            errors.append(RecipeError(f"matrix.{name} is used nowhere in the recipe", where=f"matrix.{name}",
                                      hint=f"refer to it as ${{{{ matrix.{name} }}}} in a step, or remove it"))
    if errors:
        raise RecipeErrors(errors)
    combos = list(itertools.product(*matrix.values()))
    if len(combos) > MAX_VARIANTS:
        raise RecipeError(f"the matrix makes {len(combos)} variants; the limit is {MAX_VARIANTS}", where="matrix")
    out, seen = [], set()
    for combo in combos:
        values = dict(zip(matrix, combo))
        name = variant_name(values)
        while name in seen:
            name += "-"
        seen.add(name)
        variant = substitute(body, values)
        variant.pop("bundle", None)  # only the selected variant is bundled
        out.append((name, values, variant))
    return out


def build_run(recipe_path: Path, host: Host, overrides: tuple[str, ...] | list[str] = ()) -> Plan | Sweep:
    """Read a recipe once: the checked sweep if it has a matrix, else its checked plan."""
    recipe_path = Path(recipe_path).resolve()
    raw = load_raw(recipe_path, overrides)
    if "matrix" not in raw:
        if "select" in raw:
            raise RecipeError("select: needs a matrix: to choose among", where="select",
                              hint="add a matrix, or remove select")
        return build_plan(recipe_path, host, raw=raw)
    return build_sweep(recipe_path, host, raw)


def build_sweep(recipe_path: Path, host: Host, raw: dict[str, Any]) -> Sweep:
    """The checked sweep of a recipe (read into `raw`) that has a matrix."""
    select = raw.get("select") or "smallest"
    if select not in SELECT_KEYS:
        raise RecipeError(f"select must be one of {', '.join(SELECT_KEYS)} (got {select!r})", where="select")
    variants, errors = [], []
    for name, values, variant_raw in expand(raw):
        try:
            plan = build_plan(recipe_path, host, raw=variant_raw)
        except RecipeErrors as exc:
            for err in exc.errors:
                err.where = f"variant {name}: {err.where}" if err.where else f"variant {name}"
            errors.extend(exc.errors)
            continue
        except RecipeError as exc:
            exc.where = f"variant {name}: {exc.where}" if exc.where else f"variant {name}"
            errors.append(exc)
            continue
        plan.variant, plan.matrix_values = name, values
        variants.append(Variant(name, values, variant_raw, plan))
    errors += _bundle_errors(raw.get("bundle"), raw, variants)
    if errors:
        raise RecipeErrors(errors)
    plan0 = variants[0].plan
    if select == "fastest" and plan0.recipe.evaluate.latency is None:
        raise RecipeError("select: fastest needs latency measurements", where="select",
                          hint="remove evaluate.latency: null, or select smallest")
    if select == "most_accurate" and (plan0.data is None or not plan0.data.has(plan0.recipe.evaluate.split)):
        raise RecipeError("select: most_accurate needs data.eval", where="select")
    bundle = BundleSpec.model_validate(raw.get("bundle") or {})
    return Sweep(recipe_path, str(raw.get("name", "sweep")), variants, select, bundle.model_dump())


def _bundle_errors(bundle: Any, raw: dict[str, Any], variants: list[Variant]) -> list[CompressorError]:
    """A sweep's `bundle:` is checked as a plain recipe's is: valid settings, and a last step every variant
    ends in that a bundle can be made from (the selected variant is not known until the sweep has run)."""
    from pydantic import ValidationError

    from compressor.recipe.schema import validation_errors

    if bundle is None:
        return []
    try:
        spec = BundleSpec.model_validate(bundle)
    except ValidationError as exc:
        return validation_errors(exc, raw, ("bundle",))
    errors: list[CompressorError] = []
    for v in variants:
        last = v.plan.steps[-1].output_format if v.plan.steps else v.plan.source.format
        errors += bundle_format_errors(spec.formats, last, f"variant {v.name}'s last step")
        if errors:
            break
    return errors


def run_variant(recipe_path: str, raw: dict[str, Any], name: str, values: dict[str, Any], run_dir: str,
                use_cache: bool, disabled: list[str]) -> dict[str, Any]:
    """Run one variant in this process (any executor calls this); returns its record, also when it failed."""
    from compressor.host import build_host
    from compressor.run.pipeline import run_plan

    host = build_host(disable=disabled)
    plan = build_plan(Path(recipe_path), host, raw=raw)
    plan.variant, plan.matrix_values = name, values
    try:
        return run_plan(plan, host, Path(run_dir), use_cache=use_cache, log=lambda s: print(f"[{name}] {s}",
                                                                                            flush=True))
    except CompressorError:
        record_file = Path(run_dir) / "record.json"
        if record_file.is_file():
            return json.loads(record_file.read_text())
        raise


def _execute(sweep: Sweep, run_dir: Path, executor: str, jobs: int, use_cache: bool, disabled: list[str],
             ray_address: str | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    args = [(str(sweep.recipe_path), v.raw, v.name, v.values, str(run_dir / "variants" / v.name), use_cache,
             disabled) for v in sweep.variants]
    if executor == "ray":
        return _execute_ray(args, ray_address, log)
    if jobs <= 1:
        return [run_variant(*a) for a in args]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # the first variant runs alone so that the steps every variant shares are computed once
    first = [run_variant(*args[0])]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return first + list(pool.map(run_variant, *zip(*args[1:]))) if args[1:] else first


def _execute_ray(args: list[tuple[Any, ...]], address: str | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs the `ray` package", where="--executor",
                         hint="pip install 'compressor[ray]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        import os

        cpus = os.environ.get("COMPRESSOR_RAY_CPUS")
        ray.init(address=address, num_cpus=int(cpus) if cpus and not address else None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    log(f"ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs" + (f" at {address}" if address else " (local)"))
    try:
        task = ray.remote(num_cpus=1)(run_variant)
        first = ray.get(task.remote(*args[0]))
        return [first] + ray.get([task.remote(*a) for a in args[1:]])
    finally:
        if started:
            ray.shutdown()


def choose(records: list[dict[str, Any]], select: str) -> dict[str, Any] | None:
    """The variant to keep: among those that finished and passed the guard, the best by `select`; of equally
    small (or fast) ones the most accurate, of equally accurate ones the smallest, then the first by name."""
    passing = [r for r in records if r.get("status") == "ok"]
    if not passing:
        return None
    key = SELECT_KEYS[select]
    tie = SELECT_KEYS["smallest" if select == "most_accurate" else "most_accurate"]
    return min(passing, key=lambda r: (key(r["artifacts"][-1]), tie(r["artifacts"][-1]), r.get("variant") or ""))


def run_sweep(sweep: Sweep, host: Host, run_dir: Path, executor: str = "local", jobs: int = 1,
              use_cache: bool = True, disabled: list[str] | None = None, ray_address: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every variant, write sweep.json and one report over them all, bundle the selected variant.
    Raises GuardFailed (exit 1) when no variant passes."""
    from compressor.run.pipeline import Runner, _prepare_run_dir
    from compressor.run.cache import Cache
    from compressor.report.html import write_html_report

    run_dir = Path(run_dir).resolve()
    _prepare_run_dir(run_dir)
    log(f"sweep: {len(sweep.variants)} variants ({executor}{f', {jobs} jobs' if executor == 'local' and jobs > 1 else ''})")
    records = _execute(sweep, run_dir, executor, jobs, use_cache, list(disabled or []), ray_address, log)
    for variant, record in zip(sweep.variants, records):
        record["variant"], record["matrix"] = variant.name, variant.values
    chosen = choose(records, sweep.select)
    summary: dict[str, Any] = {
        "name": sweep.name, "recipe_path": str(sweep.recipe_path), "select": sweep.select,
        "selected": chosen["variant"] if chosen else None,
        "variants": [{"name": r["variant"], "matrix": r["matrix"], "status": r["status"],
                      "run_dir": str(run_dir / "variants" / r["variant"]),
                      "final": {k: r["artifacts"][-1].get(k) for k in ("name", "size_bytes", "metric")}
                      | {"value": r["artifacts"][-1].get(r["artifacts"][-1].get("metric") or "", None),
                         "p50_ms": (r["artifacts"][-1].get("latency") or {}).get("p50_ms")},
                      "guard": r.get("guard")} for r in records],
    }
    if chosen is not None and sweep.bundle.get("formats"):
        from compressor.models.artifact import Artifact

        variant = next(v for v in sweep.variants if v.name == chosen["variant"])
        variant.plan.recipe.bundle.formats = list(sweep.bundle["formats"])
        variant.plan.recipe.bundle.tar = bool(sweep.bundle.get("tar", False))
        runner = Runner(variant.plan, host, run_dir, Cache(enabled=use_cache), log)
        final = Artifact.load(Path(chosen["artifacts"][-1]["path"]))
        summary["bundles"] = runner.write_bundles(final, chosen)
    write_json_atomic(run_dir / "sweep.json", summary)
    write_html_report(records, run_dir, title=f"{sweep.name}: {len(records)} variants",
                      selected=summary["selected"])
    log(f"✓ sweep report: {run_dir / 'report.html'}")
    if chosen is None:
        raise GuardFailed(f"none of the {len(records)} variants passed the guard (or finished)", where="select",
                          hint=f"every artifact and the report are in {run_dir}; loosen the guard or widen the matrix")
    log(f"selected: {chosen['variant']} ({sweep.select})")
    return summary
