"""The plugin host: builds the pluggy manager, loads built-in and third-party plugins,
and keeps the registries of steps, tasks and evaluators.

Built-in plugins go through exactly the same `_load_one` path as entry-point plugins.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from compressor import PLUGIN_API_VERSION, hookspecs
from compressor.errors import PluginLoadError
import compressor.models.formats as formats
from compressor.step import Step, StepConfig

ENTRY_POINT_GROUP = "compressor"
DISABLE_ENV = "COMPRESSOR_DISABLE_PLUGINS"

#: Built-in plugins: (plugin name, module).
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("tasks", "compressor.tasks.plugin"),
    ("sentence-embeddings", "compressor.tasks.sentence_embedding"),
    ("finetune", "compressor.plugins.finetune"),
    ("export-onnx", "compressor.export.onnx"),
    ("optimize-onnx", "compressor.plugins.optimize_onnx"),
    ("quantize-onnx", "compressor.plugins.quantize_onnx"),
    ("prune", "compressor.plugins.prune"),
    ("distill", "compressor.plugins.distill"),
    ("trim-vocab", "compressor.plugins.trim_vocab"),
    ("merge-adapter", "compressor.plugins.merge_adapter"),
    ("convert-fp16", "compressor.plugins.convert_fp16"),
    ("quantize-torch", "compressor.plugins.quantize_torch"),
    ("export-ort", "compressor.export.ort"),
    ("export-tensorrt", "compressor.export.tensorrt"),
    ("gguf", "compressor.plugins.gguf"),
)


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin as `compressor plugins` shows it."""

    name: str
    distribution: str
    version: str
    steps: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Host:
    """The built plugin manager with its registries."""

    pm: pluggy.PluginManager
    steps: dict[str, type[Step]] = field(default_factory=dict)
    step_provider: dict[str, str] = field(default_factory=dict)
    evaluators: dict[tuple[str, str], Any] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    task_provider: dict[str, str] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    formats: dict[str, formats.Format] = field(default_factory=formats.reset)
    format_provider: dict[str, str] = field(default_factory=lambda: {f.name: "core" for f in formats.CORE_FORMATS})

    @property
    def broken(self) -> list[PluginInfo]:
        """Plugins that failed to load."""
        return [p for p in self.plugins if p.error]

    def evaluator_for(self, task: str, fmt: str) -> Any | None:
        """The evaluator registered for this task and artifact format, if any."""
        return self.evaluators.get((task, fmt)) or self.evaluators.get((task, "*"))

    def task(self, name: str) -> Any:
        """The registered task called `name`; a RecipeError naming the known tasks otherwise."""
        if name in self.tasks:
            return self.tasks[name]
        import difflib

        from compressor.errors import RecipeError

        close = difflib.get_close_matches(name, list(self.tasks), n=2, cutoff=0.5)
        known = ", ".join(sorted(self.tasks)) or "none (is the built-in 'tasks' plugin disabled?)"
        raise RecipeError(f"unknown task {name!r}", where="model.task",
                          hint=("did you mean " + " or ".join(map(repr, close)) + "? " if close else "")
                          + f"registered tasks: {known}; a plugin adds one with the register_tasks hook")


def disabled_plugins(extra: tuple[str, ...] | list[str] = ()) -> set[str]:
    """Names disabled by `--disable-plugin` and the COMPRESSOR_DISABLE_PLUGINS variable."""
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    return names | set(extra)


def _check_step_class(cls: Any, plugin: str) -> None:
    """Refuse a step class that does not honour the Step contract."""
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise PluginLoadError(f"registered {cls!r}, which is not a compressor.step.Step subclass",
                              where=f"plugin {plugin!r}", hint="subclass compressor.step.Step")
    for attr in ("name", "summary"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise PluginLoadError(f"step class {cls.__name__} has no {attr}", where=f"plugin {plugin!r}",
                                  hint=f"set the class attribute `{attr}`")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, StepConfig)):
        raise PluginLoadError(f"step {cls.name!r} has a Config that is not a compressor.step.StepConfig",
                              where=f"plugin {plugin!r}", hint="derive Config from compressor.step.StepConfig")
    known = formats.registered()
    for fmt in (*cls.accepts, cls.produces):
        if fmt not in known:
            raise PluginLoadError(f"step {cls.name!r} names unknown format {fmt!r}", where=f"plugin {plugin!r}",
                                  hint=f"registered formats are {', '.join(known)}; a plugin adds one with the "
                                       "register_formats hook")


def _load_one(host: Host, name: str, dist: str, version: str, load: Any) -> None:
    """Import one plugin, register it, and collect its steps, tasks and evaluators (all or none of them)."""
    info = PluginInfo(name=name, distribution=dist, version=version)
    host.plugins.append(info)
    if not _import_plugin(host, info, load):
        return
    register_format, register_step, register_task, register_evaluator = _registrars(host, info)
    try:
        for hook, register in ((host.pm.hook.register_formats, register_format),
                               (host.pm.hook.register_steps, register_step),
                               (host.pm.hook.register_tasks, register_task),
                               (host.pm.hook.register_evaluators, register_evaluator)):
            for impl in hook.get_hookimpls():
                if impl.plugin_name == name:
                    impl.function(register=register)
    except Exception as exc:
        _refuse(host, info, exc)


def _import_plugin(host: Host, info: PluginInfo, load: Any) -> bool:
    """Import the plugin and register its hooks with pluggy; False (with info.error set) when it cannot be."""
    name = info.name
    try:
        plugin = load()
        api = getattr(plugin, "COMPRESSOR_PLUGIN_API", None)
        if api is not None and not _api_compatible(str(api)):
            raise PluginLoadError(
                f"plugin {name!r} declares plugin API {api}, this compressor provides {PLUGIN_API_VERSION}",
                where=f"plugin {name!r}", hint=f"upgrade the plugin or disable it with --disable-plugin {name}")
        host.pm.register(plugin, name=name)
        try:
            host.pm.check_pending()  # a misspelled hook name in this plugin
        except pluggy.PluginValidationError:
            host.pm.unregister(name=name)
            raise
    except PluginLoadError as exc:
        info.error = exc.message
        return False
    except Exception as exc:  # a broken third-party plugin must not take the host down
        info.error = f"{type(exc).__name__}: {exc}"
        return False
    return True


def _registrars(host: Host, info: PluginInfo) -> tuple[Callable[[Any], None], ...]:
    """The `register` callbacks handed to one plugin's register_formats, register_steps, register_tasks and
    register_evaluators."""
    name = info.name

    def claim(kind: str, key: str, registry: dict[str, Any], provider: dict[str, str], value: Any) -> None:
        """Register `value` under `key`, refusing a name another plugin already registered."""
        if key in registry:
            raise PluginLoadError(
                f"{kind} {key!r} is registered twice: by {_who(host, provider[key])} "
                f"and by {_who(host, name)}; the second is refused",
                where=f"plugin {name!r}", hint=f"disable one of them with --disable-plugin {name}")
        registry[key] = value
        provider[key] = name

    def register_format(fmt: Any) -> None:
        if not isinstance(fmt, formats.Format):
            raise PluginLoadError(f"registered {fmt!r}, which is not a compressor.models.formats.Format",
                                  where=f"plugin {name!r}", hint="register a Format(name, summary, ...) instance")
        claim("format", fmt.name, host.formats, host.format_provider, fmt)
        info.formats.append(fmt.name)

    def register_step(cls: Any) -> None:
        _check_step_class(cls, name)
        claim("step", cls.name, host.steps, host.step_provider, cls)
        info.steps.append(cls.name)

    def register_task(task: Any) -> None:
        from compressor.tasks.base import Task

        if not isinstance(task, Task) or not isinstance(getattr(task, "name", None), str):
            raise PluginLoadError(f"registered {task!r}, which is not a compressor.tasks.Task instance",
                                  where=f"plugin {name!r}", hint="subclass compressor.tasks.Task and register an instance")
        claim("task", task.name, host.tasks, host.task_provider, task)
        info.tasks.append(task.name)

    def register_evaluator(evaluator: Any) -> None:
        for fmt in evaluator.formats:
            host.evaluators[(evaluator.task, fmt)] = evaluator

    return register_format, register_step, register_task, register_evaluator


def _refuse(host: Host, info: PluginInfo, exc: Exception) -> None:
    """Refuse the whole plugin after a failed registration: none of its steps or tasks stay registered."""
    host.pm.unregister(name=info.name)
    for step in info.steps:
        host.steps.pop(step, None)
        host.step_provider.pop(step, None)
    info.steps = []
    for task_name in info.tasks:
        host.tasks.pop(task_name, None)
        host.task_provider.pop(task_name, None)
    info.tasks = []
    for fmt in info.formats:
        host.formats.pop(fmt, None)
        host.format_provider.pop(fmt, None)
    info.formats = []
    info.error = exc.message if isinstance(exc, PluginLoadError) else f"{type(exc).__name__} while registering: {exc}"


def _who(host: Host, plugin: str) -> str:
    dist = next((p.distribution for p in host.plugins if p.name == plugin), "?")
    return f"plugin {plugin!r} ({dist})"


def _api_compatible(spec: str) -> bool:
    """Whether a plugin's declared API range (e.g. '>=1.0,<2') includes ours."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        return PLUGIN_API_VERSION in SpecifierSet(spec if spec[0] in "<>=!~" else f"=={spec}")
    except (InvalidSpecifier, IndexError):
        return False


_current: Host | None = None


def current_host() -> Host:
    """The host built last in this process (built now if none was): what model loaders consult."""
    return _current or build_host()


def build_host(disable: tuple[str, ...] | list[str] = (), entry_points: list[Any] | None = None) -> Host:
    """Build the plugin manager: built-ins first, then the `compressor` entry points.

    `entry_points` replaces the installed ones (tests use it with fake distributions).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    host = Host(pm=pm)
    off = disabled_plugins(disable)
    from compressor import __version__

    for name, module in BUILTIN_PLUGINS:
        if name not in off:
            _load_one(host, name, "compressor", __version__, lambda m=module: importlib.import_module(m))
    global _current
    _current = host
    eps = entry_points if entry_points is not None else list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    for ep in eps:
        if ep.name in off:
            continue
        dist = getattr(ep, "dist", None)
        _load_one(host, ep.name, getattr(dist, "name", "?") if dist else "?",
                  getattr(dist, "version", "?") if dist else "?", ep.load)
    return host
