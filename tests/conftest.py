"""Shared fixtures: the tiny models and real-data slices come from compressor.testing (a pytest plugin)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Iterator
import sys
import textwrap
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


#: The tiny LLM's chain: full fine-tune, export, int4.
LLM_STEPS = ("  - uses: finetune\n    with: {method: full, epochs: 2, learning_rate: 5.0e-3, batch_size: 16, "
             "max_length: 96}\n"
             "  - uses: export-onnx\n    with: {atol: 1.0e-3, parity_rows: 8}\n"
             "  - uses: quantize-onnx\n    with: {mode: int4, block_size: 16, op_types: [MatMul, Gather]}\n")


def llm_recipe(model: Path, data: dict[str, Path], corpus: Path, steps: str = LLM_STEPS, data_extra: str = "",
               extra: str = "") -> str:
    """SST-2 as prompts and completions, perplexity on `corpus`."""
    return (f"version: 1\nname: tiny-llm\nmodel: {{path: {model}, task: text-generation}}\n"
            f"data:\n  format: tsv\n  train: {data['train']}\n  eval: {data['eval']}\n  text: sentence\n"
            f"  label: label\n  prompt: \"Review: {{text}}\\nSentiment:\"\n"
            f"  completions: {{'0': negative, '1': positive}}\n{data_extra}"
            f"steps:\n{steps}"
            f"evaluate:\n  task: {{perplexity_file: {corpus}, perplexity_tokens: 1024, window: 128, "
            f"accuracy_rows: 100, prompt_tokens: 32, new_tokens: 16, timing_runs: 1}}\n{extra}")


#: A plugin module with one step, `noop`, for the fake distributions below.
NOOP_STEP = '''
import shutil
from compressor.hookspecs import hookimpl
from compressor.step import Step, StepConfig
from pydantic import Field

class NoopConfig(StepConfig):
    note: str = Field(default="", description="Ignored.")

class Noop(Step):
    name = "{step}"
    summary = "Copies the model unchanged."
    Config = NoopConfig

    def run(self, artifact, config, ctx):
        for f in artifact.path.iterdir():
            if f.is_file() and f.name != "artifact.json":
                shutil.copy2(f, ctx.out_dir / f.name)
        return artifact.derive(ctx.out_dir)

@hookimpl
def {hook}(register):
    register(Noop)
'''


def make_dist(site: Path, dist: str, module: str, source: str, ep_name: str | None = None) -> None:
    """A minimal installed distribution: a module plus a dist-info with one `compressor` entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[compressor]\n{ep_name or dist} = {module}\n")


def site_cli(site: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m compressor ARGS` in a subprocess whose sys.path starts with the fake distributions of `site`."""
    environ = {**os.environ, "PYTHONPATH": str(site), **(env or {})}
    return subprocess.run([sys.executable, "-m", "compressor", *args], capture_output=True, text=True,
                          env=environ, timeout=120)


# Server processes (tests/test_serve.py, tests/test_sentence_embedding.py): started on a free port of 127.0.0.1.
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(command: list[str], timeout: float = 90) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start a server process (its command without --port), wait for /health 200, stop it afterwards."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("the server did not become healthy")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def bundle_server(bundle: Path, *options: str) -> list[str]:
    """The bundle's own serve.py, run by this Python."""
    return [sys.executable, str(bundle / "serve.py"), *options]


