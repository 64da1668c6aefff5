"""Progress bars (rich) for steps that take more than a moment; silent when not on a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, progress, task_id, total: int = 0, description: str = ""):  # type: ignore[no-untyped-def]
        self._progress, self._id = progress, task_id
        self._total, self._description, self._done = total, description, 0
        self._every = max(1, total // 10)

    def advance(self, n: int = 1, **fields: object) -> None:
        """Move the bar by n; `fields` (loss=…) are shown beside it."""
        desc = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        if self._progress is not None:
            self._progress.update(self._id, advance=n, info=desc)
            return
        # Not a terminal: one line every 10% so that logs show the run is alive.
        before, self._done = self._done, self._done + n
        if self._done // self._every != before // self._every or self._done == self._total:
            print(f"  {self._description}: {self._done}/{self._total} {desc}", file=sys.stderr, flush=True)


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[_Bar]:
    """A rich progress bar on stderr; a no-op where stderr is not a terminal (CI, pipes)."""
    if not sys.stderr.isatty():
        yield _Bar(None, None, total, description)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=True) as progress:
        yield _Bar(progress, progress.add_task(description, total=total, info=""))
