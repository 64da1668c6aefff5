"""Property-based fuzzing of `compressor check`: any YAML document and any `--set` override gets
exit 0 or 2 and a message — never a traceback, never a hang."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import recipe_text

pytestmark = pytest.mark.slow  # hypothesis draws hundreds of recipes

KEYS = ["version", "name", "model", "path", "task", "labels", "data", "format", "train", "eval", "text", "label",
        "steps", "uses", "with", "epochs", "ratio", "mode", "evaluate", "latency", "guard", "bundle", "seed",
        "matrix", "formats", "each_step", "max_accuracy_drop", "finetune", "prune", "quantize-onnx", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(KEYS))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)),
    max_leaves=25)
paths = st.lists(st.one_of(st.sampled_from(KEYS), st.integers(-2, 5).map(str)), min_size=1, max_size=4).map(".".join)


def _check(args: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from compressor.cli import cli

    result = CliRunner().invoke(cli, ["check", *args], catch_exceptions=True)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.stderr + result.stdout


def _assert_clean(code: int, text: str) -> None:
    assert code in (0, 2), (code, text)
    assert "Traceback" not in text and text.strip()
    if code == 2:
        assert "error:" in text


@settings(max_examples=150, deadline=5000, suppress_health_check=list(HealthCheck))
@given(doc=documents)
def test_any_yaml_document(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    _assert_clean(*_check([str(path)]))


@settings(max_examples=100, deadline=5000, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=200))
def test_any_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    _assert_clean(*_check([str(path)]))


@pytest.fixture(scope="module")
def good_recipe(tmp_path_factory, tiny_text_model, sst2_small) -> Path:
    path = tmp_path_factory.mktemp("fuzz-good") / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                "  - uses: finetune\n  - uses: export-onnx\n  - uses: quantize-onnx\n"))
    return path


@settings(max_examples=150, deadline=5000, suppress_health_check=list(HealthCheck))
@given(key=paths, value=st.one_of(st.text(max_size=30), st.integers().map(str),
                                  documents.map(lambda d: yaml.safe_dump(d, default_flow_style=True).strip())))
def test_any_override(good_recipe, key, value):
    _assert_clean(*_check([str(good_recipe), "--set", f"{key}={value}"]))


def _expand_bomb(path: str, queue) -> None:
    queue.put(_check([path]))


def test_alias_bomb_does_not_hang(tmp_path):
    """A billion-laughs document: answered with exit 2 quickly, not expanded into memory."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 15)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nversion: 1\nsteps: *a14\n")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_expand_bomb, args=(str(path), queue))
    proc.start()
    proc.join(60)
    hung = proc.is_alive()
    if hung:
        proc.kill()
    assert not hung, "check did not answer an alias bomb within 60 s"
    code, text = queue.get(timeout=5)
    assert code == 2 and "more than 100 aliases" in text
