"""The evaluator of tasks whose model gives logits for a batch: the task decodes and scores them."""

from __future__ import annotations

from typing import Any

from compressor.models.artifact import Artifact
from compressor.models.data import Example
from compressor.evaluate.base import EvalSettings, predict_batches
from compressor.tasks.base import Task


class LogitsEvaluator:
    """The task's metrics on any format compressor.models.loading.load_runner runs (PyTorch, ONNX Runtime, or a
    plugin's load_forward, e.g. TensorRT), plus latency of one forward pass."""

    #: Every format: the host falls back to a ("*") evaluator when none is registered for the exact format.
    formats = ("*",)

    def __init__(self, task: Task):
        self.task_spec = task
        self.task = task.name
        self.metric = task.metric.name
        # the evaluator's identity in the metrics cache key: a task's scoring is part of what it measures
        self.version = f"{type(task).__module__}.{type(task).__qualname__}"

    def evaluate(self, artifact: Artifact, rows: list[Example], settings: EvalSettings) -> dict[str, Any]:
        """The task's metrics on `rows` and, if asked, latency on the same inputs."""
        from compressor.evaluate.measure import latency
        from compressor.models.loading import load_runner

        runner = load_runner(artifact, settings.threads)
        texts = [r.text for r in rows]
        predictions: list[Any] = []
        for i, (enc, logits) in enumerate(predict_batches(runner, texts)):
            predictions += self.task_spec.predictions(enc, logits, artifact.labels, texts[i * 32 : (i + 1) * 32])
        result: dict[str, Any] = {**self.task_spec.score(rows, predictions, artifact.labels), "rows": len(rows)}
        if settings.latency:
            result["latency"] = latency(runner, texts, list(settings.batch_sizes), settings.runs, settings.warmup)
        return result
