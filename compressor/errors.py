"""One exception hierarchy; the CLI maps each class to one message and one exit code.

Exit codes: 0 done, 1 the guard failed, 2 bad recipe or bad input, 3 a plugin failed
to load, 4 a step failed while running.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base of every error the CLI reports without a traceback.

    `where` names the location (a recipe path such as `steps[2] (prune).with.ratio`, a
    file, a plugin), `hint` says how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def render(self) -> str:
        """The one-paragraph message shown to a user."""
        head = f"{self.where}: {self.message}" if self.where else self.message
        return f"{head}\n  hint: {self.hint}" if self.hint else head


class RecipeError(CompressorError):
    """The recipe is malformed, or names something that does not exist (exit 2)."""

    exit_code = 2


class InputError(CompressorError):
    """A model, data file or other input is missing or unusable (exit 2)."""

    exit_code = 2


class PluginLoadError(CompressorError):
    """A plugin failed to import or registered something invalid (exit 3)."""

    exit_code = 3


class StepError(CompressorError):
    """A step failed while running (exit 4)."""

    exit_code = 4


class GuardFailed(CompressorError):
    """The run finished but broke the recipe's accuracy/size/latency guard (exit 1)."""

    exit_code = 1


class RecipeErrors(RecipeError):
    """Several recipe problems found at once; rendered as a list."""

    def __init__(self, errors: list[CompressorError]):
        super().__init__(f"{len(errors)} problem(s) in the recipe")
        self.errors = errors

    def render(self) -> str:
        """All problems, one per line."""
        if len(self.errors) == 1:
            return self.errors[0].render()
        lines = [f"{len(self.errors)} problems in the recipe:"]
        lines += ["- " + e.render().replace("\n", "\n  ") for e in self.errors]
        return "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGINT, turned into an exception so that a run stops the same way on either: the step's
    temporary directory is removed and record.json says the run was interrupted. `signal_number` gives
    the exit code (128 + it)."""

    def __init__(self, signal_number: int = 15) -> None:
        super().__init__()
        self.signal_number = signal_number


_stop_signal: int | None = None


def request_termination(signal_number: int = 15) -> None:
    """Note that a stop signal arrived (the CLI's handler calls this before it raises Terminated)."""
    global _stop_signal
    _stop_signal = signal_number


def termination_requested() -> int | None:
    """The stop signal that arrived, if any: a library can swallow the handler's exception and raise its
    own instead (torch turns it into "ValueError: could not determine the shape of object type ..."),
    and the run must still stop as interrupted, not fail as a step error."""
    return _stop_signal
