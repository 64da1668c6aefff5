"""Registers the built-in evaluators through the public hook, like any plugin."""

from __future__ import annotations

from typing import Any, Callable

from compressor.hookspecs import hookimpl


@hookimpl
def register_evaluators(register: Callable[[Any], None]) -> None:
    """Accuracy for text classification and entity F1 for token classification."""
    from compressor.evaluators.text_classification import TextClassificationEvaluator
    from compressor.evaluators.token_classification import TokenClassificationEvaluator

    register(TextClassificationEvaluator())
    register(TokenClassificationEvaluator())
