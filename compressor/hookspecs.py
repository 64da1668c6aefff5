"""The hooks a plugin may implement. Each plugin is a module or object with `@hookimpl` functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from compressor.models.artifact import Artifact
    from compressor.models.formats import Format
    from compressor.evaluate.base import Evaluator
    from compressor.step import Step
    from compressor.tasks.base import Task

PROJECT = "compressor"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_steps(register: Callable[[type["Step"]], None]) -> None:
    """Contribute Step classes: call `register(StepClass)` once per step.

    Called once when the host is built. A name already registered by another plugin is
    refused with both providers named.
    """


@hookspec
def register_evaluators(register: Callable[["Evaluator"], None]) -> None:
    """Contribute evaluators: call `register(evaluator)` with an object that has `task`,
    `formats` and `evaluate(artifact, rows, settings)`.

    A later registration for the same (task, format) replaces an earlier one.
    """


@hookspec
def register_tasks(register: Callable[["Task"], None]) -> None:
    """Contribute tasks: call `register(task)` with an instance of a compressor.tasks.Task subclass.

    A task says how its models are loaded (Auto class), adapted (PEFT task type), exported, fed,
    trained and scored (metrics with a direction), and what a bundle of it answers. A task name
    already registered by another plugin is refused with both providers named.
    """


@hookspec
def register_formats(register: Callable[["Format"], None]) -> None:
    """Contribute artifact formats: call `register(Format(...))` for each format this plugin's steps write
    (compressor.models.formats.Format: its model file, whether ONNX Runtime runs it, how a bundle of it is
    made from an `onnx` artifact). Called before the plugin's steps are registered, so that their
    `accepts` and `produces` may name it; a name already registered is refused with both providers named.
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add commands to the `compressor` CLI with `cli.add_command(...)`."""


@hookspec(firstresult=True)
def load_hf_model(path: str, task: str, config: dict[str, Any]) -> Any | None:
    """Load an `hf` artifact that this plugin saved in its own layout; return None for any other.

    `config` is the directory's config.json. Called, in plugin order, whenever compressor loads an
    `hf` model (steps, evaluators, export-onnx); the first non-None model wins. A plugin whose step
    replaces modules (say, a Linear by two smaller ones) marks its models with a key in config.json
    and rebuilds them here, so that every later step can read them.
    """


@hookspec(firstresult=True)
def convert_input_model(path: str, cache_dir: str, log: Callable[[str], None]) -> str | None:
    """Turn a recipe's `model.path` that is not an `hf` directory (say, a GGUF file) into one: return the
    directory, or None when the input is not this plugin's. Called at `check`, before the model is inspected.
    Write under `cache_dir` (keyed on the input's content, so a second run reuses it) and never modify
    the input; `log` prints a line for the user. The first non-None answer wins.
    """


@hookspec(firstresult=True)
def load_forward(artifact: "Artifact", threads: int) -> tuple[Callable[[dict[str, Any]], Any], list[str]] | None:
    """Run an artifact of a format that compressor's own runtimes do not run (PyTorch runs `hf`, ONNX
    Runtime `onnx` and `ort`): return (forward, input names), where forward maps a batch of numpy inputs
    to the logits as numpy; None for any other artifact. The first non-None answer wins. Raise
    compressor.errors.InputError when the format is yours but this machine cannot run it (say, no GPU).
    """


@hookspec
def step_started(index: int, name: str, config: dict[str, Any], artifact: "Artifact") -> None:
    """Observer: a step is about to run on `artifact` (not called for cached steps)."""


@hookspec
def step_finished(index: int, name: str, artifact: "Artifact", record: dict[str, Any]) -> None:
    """Observer: a step produced `artifact`; `record` is its entry in record.json."""


@hookspec
def run_finished(run_dir: str, record: dict[str, Any]) -> None:
    """Observer: the run ended; `record` is the content of record.json."""
