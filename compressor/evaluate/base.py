"""The evaluator contract and the scoring of one artifact."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from compressor.models.artifact import Artifact
from compressor.models.data import Example


@dataclass
class EvalSettings:
    """How an artifact is measured (from the recipe's `evaluate:`)."""

    threads: int = 2
    batch_sizes: tuple[int, ...] = (1, 32)
    runs: int = 50
    warmup: int = 5
    latency: bool = True
    max_rows: int | None = None
    #: the task's own evaluation settings (recipe evaluate.task, checked by the task's EvalConfig)
    task: dict[str, Any] = field(default_factory=dict)
    #: the run's input model directory, which an evaluator may compare an artifact against (sentence
    #: embeddings' fidelity); None outside a run
    source: str | None = None


class Evaluator(Protocol):
    """What `register_evaluators` accepts: a task, the formats it can run (`"*"`: every format that has no
    evaluator of its own for the task), a metric, and `evaluate`."""

    task: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    metric: ClassVar[str]

    def evaluate(self, artifact: Artifact, rows: list[Example], settings: EvalSettings) -> dict[str, Any]:
        """Return at least `{metric: value}`; latency keys may be added."""


def predict_batches(runner: Any, texts: list[Any], batch_size: int = 32) -> list[tuple[Any, Any]]:
    """Encoded batches with their logits, in order."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = runner.encode(texts[i : i + batch_size])
        out.append((enc, runner(enc)))
    return out
