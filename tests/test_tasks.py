"""Tasks are registered objects: the two built-in ones go through the public hook, a plugin adds a new one
without touching core code, and a metric whose lower value is better is compared the right way round by
the guard, sweep selection, Pareto fronts and quantize-onnx's search."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import recipe_text

REPO = Path(__file__).resolve().parent.parent


def _error_rate_plugin(name: str = "sentiment-error"):
    """A third-party task: SST-2 sentiment scored by error rate (lower is better), with its evaluator."""
    from compressor.evaluate.logits import LogitsEvaluator
    from compressor.hookspecs import hookimpl
    from compressor.tasks import Metric
    from compressor.tasks.text_classification import TextClassification

    class SentimentError(TextClassification):
        metrics = (Metric("error_rate", higher_is_better=False),)

        def score(self, rows, predictions, labels):
            return {"error_rate": 1.0 - super().score(rows, predictions, labels)["accuracy"]}

    SentimentError.name = name
    task = SentimentError()

    class Plugin:
        @hookimpl
        def register_tasks(self, register):
            register(task)

        @hookimpl
        def register_evaluators(self, register):
            register(LogitsEvaluator(task))

    return Plugin()


def test_no_core_module_names_a_task():
    from compressor.host import build_host

    names = sorted(build_host().tasks)
    assert names == ["sentence-embedding", "text-classification", "text-generation", "token-classification"]
    sources = [p for d in ("compressor", "plugins", "export") for p in (REPO / d).rglob("*.py")
               if "tasks" not in p.relative_to(REPO).parts and p.name != "testing.py"]
    assert len(sources) > 30
    named = [(p.relative_to(REPO), n) for p in sources for n in names
             if re.search(rf"[\"']{re.escape(n)}[\"']", p.read_text(encoding="utf-8"))]
    assert named == []


def test_an_unknown_task_is_one_message_naming_the_registered_ones(tmp_path, cli_run, tiny_text_model):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, None, None, "  - uses: export-onnx\n", task="text-clasification"))
    code, out, err = cli_run("check", str(path))
    assert code == 2
    assert "unknown task 'text-clasification'" in err and "did you mean 'text-classification'" in err
    assert "token-classification" in err and "Traceback" not in err


def test_a_task_registered_twice_is_refused():
    from compressor.host import build_host
    from compressor.testing import register_plugin

    host = build_host()
    with pytest.raises(RuntimeError, match="task 'text-classification' is registered twice"):
        register_plugin(host, _error_rate_plugin("text-classification"), name="again")
    assert type(host.tasks["text-classification"]).__name__ == "TextClassification"


def test_a_plugin_task_runs_end_to_end_with_its_metric_direction(tmp_path, compressor_cache, tiny_text_model,
                                                                  sst2_small):
    from compressor.host import build_host
    from compressor.testing import register_plugin, run_recipe

    steps = "  - uses: export-onnx\n  - uses: quantize-onnx\n"
    reference = run_recipe(recipe_text(tiny_text_model, None, sst2_small["eval"], steps), tmp_path / "ref")
    host = build_host()
    register_plugin(host, _error_rate_plugin())
    text = recipe_text(tiny_text_model, None, sst2_small["eval"], steps, task="sentiment-error",
                       extra="guard: {max_accuracy_drop: 1.0}\nbundle: {formats: [onnx]}\n")
    record = run_recipe(text, tmp_path / "plugin", host=host)
    for ours, theirs in zip(record["artifacts"], reference["artifacts"]):
        assert ours["metric"] == "error_rate" and ours["higher_is_better"] is False
        assert ours["error_rate"] == pytest.approx(1.0 - theirs["accuracy"], abs=1e-12)
    check = record["guard"]["checks"][0]
    # a rise in error rate is a drop: the guard's drop is final − reference, not reference − final
    assert check["drop"] == pytest.approx(record["artifacts"][-1]["error_rate"] - record["artifacts"][0]["error_rate"])
    assert (tmp_path / "plugin" / "run" / "bundle" / "manifest.json").is_file()


def _records(values: list[float], higher_is_better: bool, metric: str = "perplexity") -> list[dict]:
    return [{"index": i, "name": f"a{i}", "format": "onnx", "metric": metric, metric: v, "size_bytes": 1000 - i,
             "higher_is_better": higher_is_better} for i, v in enumerate(values)]


@pytest.mark.parametrize("values, budget, passed", [([20.0, 20.4], 0.5, True), ([20.0, 20.6], 0.5, False),
                                                    ([20.0, 12.0], 0.0, True)])
def test_the_guard_reads_the_metric_direction(values, budget, passed):
    from compressor.run.guard import check_guard
    from compressor.recipe.schema import GuardSpec

    result = check_guard(GuardSpec(max_accuracy_drop=budget), _records(values, higher_is_better=False))
    assert result["passed"] is passed
    assert result["checks"][0]["drop"] == pytest.approx(values[1] - values[0])
    if not passed:
        assert "perplexity rose by 0.6000" in result["failures"][0]
    # the same numbers as an accuracy: the direction flips the verdict of a real change
    flipped = check_guard(GuardSpec(max_accuracy_drop=budget), _records(values, higher_is_better=True,
                                                                        metric="accuracy"))
    assert flipped["checks"][0]["drop"] == pytest.approx(values[0] - values[1])


def test_sweep_selection_and_pareto_front_read_the_metric_direction():
    from compressor.report.html import pareto_front, quality
    from compressor.recipe.sweep import SELECT_KEYS, choose

    lower = _records([30.0, 25.0, 40.0], higher_is_better=False)
    assert min(lower, key=SELECT_KEYS["most_accurate"])["perplexity"] == 25.0
    higher = _records([0.80, 0.85, 0.90], higher_is_better=True, metric="accuracy")
    assert max(higher, key=lambda a: -SELECT_KEYS["most_accurate"](a))["accuracy"] == 0.90
    # variants of one size (int4 settings that change no byte count): the best metric wins, in its direction
    tied = [{"status": "ok", "variant": name, "artifacts": [dict(a, size_bytes=1000)]}
            for name, a in zip(["a-64", "b-256", "c-512"], lower)]
    assert choose(tied, "smallest")["variant"] == "b-256"
    tied_acc = [{"status": "ok", "variant": name, "artifacts": [dict(a, size_bytes=1000)]}
                for name, a in zip(["a-64", "b-256", "c-512"], higher)]
    assert choose(tied_acc, "smallest")["variant"] == "c-512"
    # sizes fall with the index: a2 is smallest; with perplexity 40 it is still on the front (smallest),
    # a1 (25, better and smaller than a0) is on it, a0 (30, larger and worse than a1) is not
    points = [{"metric": a["perplexity"], "higher_is_better": False} for a in lower]
    front = pareto_front([(a["size_bytes"], quality(p)) for a, p in zip(lower, points)])
    assert sorted(front) == [1, 2]
