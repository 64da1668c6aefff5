"""The `compressor` command line. Imports stay light: no torch until a step or evaluator runs."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from compressor import PLUGIN_API_VERSION, __version__
from compressor.errors import CompressorError
from compressor.models.formats import ONNX
from compressor.serve import options as serve_options

EXIT_INTERNAL = 4


def _err(text: str) -> None:
    click.echo(text, err=True)


def _stop_cleanly_on_signals() -> None:
    """Make SIGTERM (what `kill`, systemd and schedulers send) and Ctrl-C stop a run the same way, and
    remember which arrived, so that a library that swallows the exception cannot turn it into a failure."""
    import signal

    from compressor.errors import Terminated, request_termination

    def raise_terminated(signum: int, frame: Any) -> None:
        request_termination(signum)
        raise Terminated(signum)

    try:
        signal.signal(signal.SIGTERM, raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (a background job)
            signal.signal(signal.SIGINT, raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CompressorError into one message and its exit code; no traceback unless --debug."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except CompressorError as exc:
            if debug:
                raise
            _err(f"error: {exc.render()}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            _err("interrupted: finished steps are cached; run the same command again to resume")
            sys.exit(128 + getattr(exc, "signal_number", 2))
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug or an unexpected library failure
            if debug:
                raise
            from compressor.run.pipeline import failure_hint

            _err(f"error: unexpected {type(exc).__name__}: {exc}\n  hint: {failure_hint(exc)}")
            sys.exit(EXIT_INTERNAL)

    return wrapper


class PluginGroup(click.Group):
    """A group that adds plugin commands (`register_commands`) the first time commands are listed."""

    _loaded = False

    def _load_plugin_commands(self, ctx: click.Context) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            host = get_host(ctx)
            host.pm.hook.register_commands(cli=self)
        except CompressorError as exc:
            _err(f"warning: plugin commands unavailable: {exc.render()}")

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands(ctx)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        found = super().get_command(ctx, name)
        if found is None:
            self._load_plugin_commands(ctx)
            found = super().get_command(ctx, name)
        return found


def get_host(ctx: click.Context) -> Any:
    """The plugin host, built once per command from the global options."""
    root = ctx.find_root()
    if root.obj is None:
        from compressor.host import build_host

        root.obj = build_host(disable=root.params.get("disable_plugin") or ())
        for p in root.obj.broken:
            _err(f"warning: plugin {p.name!r} ({p.distribution}) failed to load: {p.error}\n"
                 f"  hint: fix or reinstall it, or disable it with --disable-plugin {p.name} "
                 f"or COMPRESSOR_DISABLE_PLUGINS={p.name}")
    return root.obj


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compressor")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("--disable-plugin", multiple=True, metavar="NAME",
              help="Do not load this plugin (repeatable; also COMPRESSOR_DISABLE_PLUGINS=a,b).")
def cli(debug: bool, disable_plugin: tuple[str, ...]) -> None:
    """Compress transformer models with checked recipes: merge, prune, distill, quantize, export — measured."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List plugins, their versions, their steps and tasks."""
    host = get_host(ctx)
    rows = [p.__dict__ for p in host.plugins]
    if as_json:
        click.echo(json.dumps({"plugin_api": PLUGIN_API_VERSION, "plugins": rows}, indent=2))
        return
    click.echo(f"compressor {__version__} · plugin API {PLUGIN_API_VERSION}")
    for p in host.plugins:
        provides = p.steps + [f"task {t}" for t in p.tasks]
        state = f"FAILED: {p.error}" if p.error else ", ".join(provides) or "(hooks only)"
        click.echo(f"  {p.name:<20} {p.distribution} {p.version:<10} {state}")


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--markdown", is_flag=True, help="The reference page of compressor's own steps (docs/steps.md).")
@click.pass_context
@handle_errors
def steps(ctx: click.Context, name: str | None, as_json: bool, markdown: bool) -> None:
    """List steps, or describe one step's formats and config fields."""
    from compressor.errors import RecipeError
    from compressor.recipe.step_reference import field_bounds, field_kind, step_details, steps_markdown

    host = get_host(ctx)
    if markdown:
        builtin = {p.name for p in host.plugins if p.distribution == "compressor"}
        own = {n: c for n, c in host.steps.items() if host.step_provider[n] in builtin}
        click.echo(steps_markdown(own), nl=False)
        return
    if name is None:
        rows = [{**step_details(c), "provider": host.step_provider[n]} for n, c in sorted(host.steps.items())]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            click.echo(f"  {r['name']:<16} {'/'.join(r['accepts'])} → {r['produces']:<5} {r['summary']}")
        return
    if name not in host.steps:
        import difflib

        close = difflib.get_close_matches(name, list(host.steps), n=3)
        raise RecipeError(f"unknown step {name!r}", hint=("did you mean " + " or ".join(close) + "?") if close
                          else "`compressor steps` lists them")
    details = {**step_details(host.steps[name]), "provider": host.step_provider[name]}
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    click.echo(f"{details['name']} (v{details['version']}, from {details['provider']}): {details['summary']}")
    click.echo(f"  formats: {' | '.join(details['accepts'])} → {details['produces']}")
    if details["needs_data"]:
        click.echo(f"  needs data: {', '.join(details['needs_data'])}")
    click.echo("  config (`with:`):")
    for field, info in details["config"].items():
        bounds, kind = field_bounds(info), field_kind(info)
        default = "required" if info["required"] else f"default {json.dumps(info.get('default'))}"
        click.echo(f"    {field:<22} {kind} ({default}{', ' + bounds if bounds else ''})")
        click.echo(f"      {info.get('description', '')}")


@cli.command()
@click.pass_context
@handle_errors
def schema(ctx: click.Context) -> None:
    """Print the JSON Schema of recipes (for editors), with every step's `with:`."""
    from compressor.recipe.json_schema import recipe_schema

    click.echo(json.dumps(recipe_schema(get_host(ctx)), indent=2))


def _print_plan(plan: Any) -> None:
    click.echo(f"recipe {plan.recipe.name!r}: {plan.recipe_path}")
    click.echo(f"  model: {plan.source.path} ({plan.source.format}, {plan.source.task}"
               + (f", labels {plan.source.labels}" if plan.source.labels
                  else "" if plan.source.info.has_head else ", no task head") + ")")
    if plan.data:
        click.echo(f"  data: {plan.data.format} " + ", ".join(f"{k}={v}" for k, v in plan.data.splits.items()))
        if plan.data.has("tune"):
            click.echo(f"  tuning rows: {plan.data.tuning_source()}")
    for s in plan.steps:
        click.echo(f"  {s.index}. {s.name:<14} {s.input_format} → {s.output_format}  "
                   f"{json.dumps(s.config.model_dump(mode='json', exclude_defaults=True))}")
    for w in plan.warnings:
        click.echo(f"  warning: {w}")


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.pass_context
@handle_errors
def check(ctx: click.Context, recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check a recipe and print its plan, without loading any model weights."""
    from compressor.recipe.sweep import Sweep, build_run

    plan = build_run(recipe, get_host(ctx), overrides)
    if isinstance(plan, Sweep):
        _print_sweep(plan)
        click.echo(f"ok: the sweep is valid ({len(plan.variants)} variants)")
        return
    _print_plan(plan)
    click.echo("ok: the recipe is valid")


def _print_sweep(sweep: Any) -> None:
    click.echo(f"sweep {sweep.name!r}: {len(sweep.variants)} variants, select {sweep.select}")
    for v in sweep.variants:
        click.echo(f"  variant {v.name}: " + json.dumps(v.values))
    _print_plan(sweep.variants[0].plan)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default: runs/NAME).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--no-cache", is_flag=True, help="Recompute every step and measurement.")
@click.option("--jobs", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Sweeps: run this many variants at once in local processes.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Sweeps: run variants locally or as Ray tasks (the `ray` extra).")
@click.option("--ray-address", default=None, help="With --executor ray: an existing cluster (default: start one).")
@click.pass_context
@handle_errors
def run(ctx: click.Context, recipe: Path, out: Path | None, overrides: tuple[str, ...], no_cache: bool,
        jobs: int, executor: str, ray_address: str | None) -> None:
    """Run a recipe (or a sweep): every step, measured; writes record.json, the reports and the bundle."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with quiet_libraries():
        _run(ctx, recipe, out, overrides, no_cache, jobs, executor, ray_address)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Library warnings (torch's tracer, transformers' deprecations) silenced while a run prints its own
    progress; the warning filters and transformers' log level are restored afterwards, so a caller that
    invokes the CLI in-process keeps its own."""
    import logging
    import warnings

    logger = logging.getLogger("transformers")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def _run(ctx: click.Context, recipe: Path, out: Path | None, overrides: tuple[str, ...], no_cache: bool,
         jobs: int, executor: str, ray_address: str | None) -> None:
    from compressor.run.pipeline import run_plan

    host = get_host(ctx)
    click.echo("plugins: " + ", ".join(f"{p.name} ({p.distribution} {p.version})" for p in host.plugins
                                       if not p.error), err=True)
    from compressor.recipe.sweep import Sweep, build_run, run_sweep

    plan = build_run(recipe, host, overrides)
    if isinstance(plan, Sweep):
        sweep = plan
        _print_sweep(sweep)
        run_dir = out or Path("runs") / sweep.name
        _stop_cleanly_on_signals()
        disabled = list(ctx.find_root().params.get("disable_plugin") or ())
        try:
            run_sweep(sweep, host, run_dir, executor=executor, jobs=jobs, use_cache=not no_cache,
                      disabled=disabled, ray_address=ray_address, log=lambda s: click.echo(s, err=True))
        finally:
            if (run_dir / "sweep.json").is_file():
                click.echo(f"sweep report: {run_dir / 'report.html'}")
        return
    _print_plan(plan)
    run_dir = out or Path("runs") / plan.recipe.name
    _stop_cleanly_on_signals()
    try:
        run_plan(plan, host, run_dir, use_cache=not no_cache, log=lambda s: click.echo(s, err=True))
    finally:
        report = run_dir / "report.md"
        if report.is_file():
            click.echo("")
            click.echo(report.read_text())
            click.echo(f"run directory: {run_dir}")


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Where to write report.html (default: the only run "
              "directory, or ./report).")
@click.pass_context
@handle_errors
def report_cmd(ctx: click.Context, run_dirs: tuple[Path, ...], out: Path | None) -> None:
    """One HTML report (one Pareto front) over one or more run directories, e.g. ours against a baseline."""
    from compressor.errors import InputError
    from compressor.report.html import write_html_report

    records = []
    for run_dir in run_dirs:
        if (run_dir / "sweep.json").is_file():
            sweep = json.loads((run_dir / "sweep.json").read_text())
            paths = [Path(v["run_dir"]) / "record.json" for v in sweep["variants"]]
        else:
            paths = [run_dir / "record.json"]
        for path in paths:
            if not path.is_file():
                raise InputError(f"{path.parent} is not a run directory (no record.json)", where=str(run_dir),
                                 hint="give directories written by `compressor run`")
            try:
                record = json.loads(path.read_text())
                record["artifacts"], record["name"]  # noqa: B018 - the fields the report reads
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path} is not a compressor record", where=str(run_dir)) from None
            if len(run_dirs) > 1 and not record.get("variant"):
                record["variant"] = run_dir.name
            records.append(record)
    target = out or (run_dirs[0] if len(run_dirs) == 1 else Path("report"))
    path = write_html_report(records, target, title=None if len(records) == 1 else f"{len(records)} runs compared")
    click.echo(f"report: {path}")


def _final_artifact(path: Path) -> Any:
    """The artifact a `compressor bundle` argument names: a run directory (its last artifact) or an artifact."""
    from compressor.models.artifact import META_FILE, Artifact
    from compressor.errors import InputError

    if (path / "record.json").is_file():
        record = json.loads((path / "record.json").read_text())
        if not record.get("steps"):
            raise InputError(f"run {path} has no finished step", where=str(path))
        return Artifact.load(Path(record["steps"][-1]["path"])), record
    if (path / META_FILE).is_file():
        return Artifact.load(path), None
    raise InputError(f"{path} is neither a run directory (record.json) nor an artifact (artifact.json)",
                     where=str(path), hint="give runs/NAME or runs/NAME/artifacts/NN-step")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--format", "fmt", default=ONNX, show_default=True,
              help="A registered format ONNX Runtime runs (onnx, ort); converted from an onnx artifact when needed.")
@click.option("--tar", is_flag=True, help="Also write OUT.tar.gz.")
@click.pass_context
@handle_errors
def bundle(ctx: click.Context, source: Path, out: Path, fmt: str, tar: bool) -> None:
    """Pack a run's final artifact (or any onnx/ort artifact) for a device with only onnxruntime."""
    import shutil
    import tempfile

    from compressor.bundle.writer import write_bundle
    from compressor.errors import InputError
    from compressor.models.formats import bundle_format_errors, format_named

    get_host(ctx)
    artifact, record = _final_artifact(source)
    problems = bundle_format_errors([fmt], artifact.format, f"artifact {artifact.path}")
    if problems:
        raise InputError(problems[0].message, where="--format", hint=problems[0].hint)
    if fmt == artifact.format:
        result = write_bundle(artifact, out, record, tar=tar)
    else:
        work = Path(tempfile.mkdtemp(prefix=f".compressor-{fmt}-"))
        try:
            result = write_bundle(format_named(fmt).from_onnx(artifact, work), out, record, tar=tar)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(f"bundle: {result['path']} ({', '.join(result['files'])}); needs onnxruntime >= "
               f"{result['min_onnxruntime']}" + (f"; archive {result['tar']}" if result["tar"] else ""))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@serve_options
@handle_errors
def serve(path: Path, **settings: Any) -> None:
    """Serve a bundle (directory or .tar.gz) over HTTP: OpenAI- and KServe v2-compatible routes, micro-batching
    and continuous batching, /health and Prometheus /metrics (pip install 'compressor[serve]')."""
    from compressor.serve import run

    run(path, settings)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.pass_context
@handle_errors
def verify(ctx: click.Context, path: Path) -> None:
    """Check a bundle: manifest schema, every checksum, the model loads, golden outputs match."""
    import tempfile

    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.bundle.writer import open_bundle
    from compressor.errors import InputError

    with tempfile.TemporaryDirectory() as work:
        try:
            result = bundle_runtime.verify(open_bundle(path, Path(work)))
        except bundle_runtime.BundleError as exc:
            raise InputError(str(exc), where=str(path), hint="rebuild the bundle, or copy it again") from None
    click.echo(bundle_runtime.describe_verdict(result))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True)
@click.pass_context
@handle_errors
def predict(ctx: click.Context, path: Path, texts: tuple[str, ...]) -> None:
    """Run a bundle on TEXTS: labels and scores, entities for token classification, or a generator's streamed
    answer."""
    import tempfile

    from compressor.bundle.device import runtime as bundle_runtime
    from compressor.bundle.writer import open_bundle
    from compressor.errors import InputError

    with tempfile.TemporaryDirectory() as work:
        try:
            predictor = bundle_runtime.Predictor(open_bundle(path, Path(work)))
            if predictor.streams:  # a generator streams its answers as plain text
                for text in texts:
                    for piece in predictor.stream(text):
                        click.echo(piece, nl=False)
                    click.echo()
                return
            results = predictor.predict(list(texts))
        except bundle_runtime.BundleError as exc:
            raise InputError(str(exc), where=str(path)) from None
    for text, result in zip(texts, results):
        click.echo(json.dumps({"text": text, "prediction": result}, ensure_ascii=False))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="compressor")


if __name__ == "__main__":
    main()
