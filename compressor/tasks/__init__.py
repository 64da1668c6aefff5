"""Tasks: registered objects that say how a kind of model is loaded, fed, trained, scored and bundled."""

from __future__ import annotations

from compressor.tasks.base import DistillPairs, Metric, Task


def task_for(name: str) -> Task:
    """The registered task called `name` (from the plugin host); raises RecipeError naming the known ones."""
    from compressor.host import current_host

    return current_host().task(name)


__all__ = ["DistillPairs", "Metric", "Task", "task_for"]
