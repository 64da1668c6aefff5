"""Shared fixtures: the tiny models and real-data slices come from compressor.testing (a pytest plugin)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli_run(compressor_cache: Path):
    """Invoke the CLI in-process; returns (exit_code, stdout, stderr)."""
    from compressor.cli import cli

    def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=True)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return _run


def recipe_text(model: Path, train: Path | None, eval_: Path | None, steps: str, extra: str = "",
                task: str = "text-classification", data_format: str = "tsv", labels: str = "",
                data_extra: str = "") -> str:
    """A recipe for the tiny models and data slices (`data_extra`: more `data:` lines, e.g. a holdout)."""
    data = ""
    if train or eval_:
        data = f"data:\n  format: {data_format}\n"
        data += f"  train: {train}\n" if train else ""
        data += f"  eval: {eval_}\n" if eval_ else ""
        data += data_extra
        if data_format == "conll":
            data += "  text: tokens\n  label: ner_tags\n"
    return (f"version: 1\nname: test\nmodel: {{path: {model}, task: {task}{labels}}}\n{data}steps:\n{steps}\n"
            f"evaluate: {{latency: {{runs: 5, warmup: 1, batch_sizes: [1, 8]}}}}\n{extra}")


FLOAT_STEPS = ("  - uses: finetune\n    with: {epochs: 3, learning_rate: 2.0e-3}\n  - uses: export-onnx\n")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, tiny_encoder, sst2_small):
    """A tiny classifier fine-tuned on the SST-2 slice and exported to ONNX, with the cache that holds both."""
    from compressor.testing import run_recipe

    tmp = tmp_path_factory.mktemp("trained")
    record = run_recipe(recipe_text(tiny_encoder, sst2_small["train"], sst2_small["eval"], FLOAT_STEPS,
                                    labels=", labels: [negative, positive]"), tmp, cache=tmp / "cache")
    return {"tmp": tmp, "record": record, "model": tiny_encoder, "data": sst2_small}
