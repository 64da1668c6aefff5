"""Accuracy of sentence classifiers, on PyTorch or ONNX Runtime."""

from __future__ import annotations

from typing import Any

from compressor.artifact import Artifact
from compressor.data import Example, label_ids
from compressor.evaluators.base import EvalSettings, predict_batches


class TextClassificationEvaluator:
    """Accuracy for `text-classification`, plus latency on the artifact's runtime."""

    task = "text-classification"
    formats = ("hf", "onnx", "ort", "engine")
    metric = "accuracy"

    def evaluate(self, artifact: Artifact, rows: list[Example], settings: EvalSettings) -> dict[str, Any]:
        """Accuracy on `rows` and, if asked, latency on the same sentences."""
        import numpy as np

        from compressor.evaluators.measure import latency
        from compressor.evaluators.runtime import load_runner

        runner = load_runner(artifact, settings.threads)
        mapping = label_ids(artifact.labels, {r.label for r in rows})
        texts = [r.text for r in rows]
        preds = np.concatenate([logits.argmax(-1) for _, logits in predict_batches(runner, texts)])
        gold = np.array([mapping[r.label] for r in rows])
        result: dict[str, Any] = {"accuracy": float((preds == gold).mean()), "rows": len(rows)}
        if settings.latency:
            result["latency"] = latency(runner, texts, list(settings.batch_sizes), settings.runs, settings.warmup)
        return result
