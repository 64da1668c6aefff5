"""Sentence classification on the device: one label and its probability per text."""

from __future__ import annotations

import sys
from typing import Any

if "predict" in sys.modules:  # inside a bundle: its own predict.py, which loaded this file
    from predict import LogitAnswers, softmax
else:
    from compressor.bundle.device.runtime import LogitAnswers, softmax


class Answers(LogitAnswers):
    """{label, score} per text: the most probable class."""

    def decode(self, texts: list[Any], encodings: list[Any], logits: Any) -> list[Any]:
        """The arg-max label and its softmax probability per row."""
        labels = self.predictor.manifest["labels"]
        return [{"label": labels[int(p.argmax())], "score": float(p.max())} for p in softmax(logits)]
