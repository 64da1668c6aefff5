"""Registers the built-in tasks and their evaluators through the public hooks, like any plugin."""

from __future__ import annotations

from typing import Any, Callable

from compressor.hookspecs import hookimpl


@hookimpl
def register_tasks(register: Callable[[Any], None]) -> None:
    """Sentence classification, word tagging and text generation."""
    from compressor.tasks.text_classification import TextClassification
    from compressor.tasks.text_generation import TextGeneration
    from compressor.tasks.token_classification import TokenClassification

    register(TextClassification())
    register(TokenClassification())
    register(TextGeneration())


@hookimpl
def register_evaluators(register: Callable[[Any], None]) -> None:
    """The classifiers are measured by the logits evaluator, on every format; generators by their own."""
    from compressor.evaluate.logits import LogitsEvaluator
    from compressor.tasks.text_classification import TextClassification
    from compressor.tasks.text_generation import GenerationEvaluator
    from compressor.tasks.token_classification import TokenClassification

    register(LogitsEvaluator(TextClassification()))
    register(LogitsEvaluator(TokenClassification()))
    register(GenerationEvaluator())
