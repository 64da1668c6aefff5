"""The guard: a baseline is measured even when only the last step is, and a broken budget exits 1
with every artifact and the report still written."""

from __future__ import annotations

import json

import pytest

from conftest import recipe_text

STEPS = "  - uses: export-onnx\n  - uses: quantize-onnx\n"


def test_baseline_is_measured_without_each_step(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from compressor.testing import run_recipe

    text = recipe_text(tiny_text_model, None, sst2_small["eval"], STEPS).replace(
        "evaluate: {", "evaluate: {each_step: false, ") + "guard: {max_accuracy_drop: 0.05}\n"
    record = run_recipe(text, tmp_path)
    assert "accuracy" in record["artifacts"][0] and "accuracy" not in record["artifacts"][1]
    check = record["guard"]["checks"][0]
    assert check["baseline"] == "input" and check["reference"] == record["artifacts"][0]["accuracy"]


def test_each_step_as_a_list_measures_the_named_artifacts_and_the_last(tmp_path, compressor_cache, tiny_text_model,
                                                                       sst2_small):
    from compressor.testing import run_recipe

    text = recipe_text(tiny_text_model, None, sst2_small["eval"], STEPS).replace(
        "evaluate: {", "evaluate: {each_step: [export-onnx], ") + "guard: {max_accuracy_drop: 0.05}\n"
    record = run_recipe(text, tmp_path)
    measured = [a["name"] for a in record["artifacts"] if "accuracy" in a]
    assert measured == ["export-onnx", "quantize-onnx"]
    assert all(a["size_bytes"] > 0 for a in record["artifacts"])
    check = record["guard"]["checks"][0]
    assert check["baseline"] == "export-onnx" and check["reference"] == record["artifacts"][1]["accuracy"]


def test_the_budget_is_measured_from_the_named_baseline(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from compressor.testing import run_recipe

    text = recipe_text(tiny_text_model, None, sst2_small["eval"], STEPS) + (
        "guard: {max_accuracy_drop: 0.05, baseline: export-onnx}\n")
    record = run_recipe(text, tmp_path)
    check = record["guard"]["checks"][0]
    assert check["baseline"] == "export-onnx" and check["reference"] == record["artifacts"][1]["accuracy"]
    assert check["drop"] == record["artifacts"][1]["accuracy"] - record["artifacts"][2]["accuracy"]


def test_a_named_baseline_moves_the_verdict():
    from compressor.run.guard import check_guard
    from compressor.recipe.schema import GuardSpec

    # perplexity 20 (the input), 21 after fine-tuning, 21.9 quantized: +9.5% from the input, +4.3% from 21
    artifacts = [{"index": i, "name": n, "metric": "perplexity", "perplexity": v, "higher_is_better": False,
                  "size_bytes": 1} for i, (n, v) in enumerate([("input", 20.0), ("finetune", 21.0), ("q", 21.9)])]
    guard = GuardSpec(max_accuracy_drop=0.05, relative=True)
    assert not check_guard(guard, artifacts)["passed"]
    assert check_guard(guard, artifacts, baseline_index=1)["passed"]
    result = check_guard(guard, artifacts[:1] + [dict(artifacts[1], perplexity=None)] + artifacts[2:], 1)
    assert result["unmeasured"] == ["guard.baseline, artifact 1, has no measured perplexity"]


@pytest.mark.parametrize("guard, words", [
    ("{max_accuracy_drop: 0.05, baseline: prune}",
     ["guard.baseline", "'prune' is not a step of this recipe", "export-onnx"]),
    ("{max_accuracy_drop: 0.05, baseline: 3}",
     ["guard.baseline", "guard.baseline 3 is not an artifact of this run (0 to 2)"]),
    ("{baseline: export-onnx}", ["guard.baseline", "max_accuracy_drop and guard.metrics, and neither is set"]),
    ("{metrics: {f1: 0.01}}", ["guard.metrics.f1", "text-classification models report no metric 'f1'", "accuracy"]),
    ("{metrics: {accuracy: -0.01}}", ["the budget of accuracy is negative"]),
])
def test_a_bad_baseline_or_metric_budget_is_refused_at_check(tmp_path, cli_run, tiny_text_model, sst2_small, guard,
                                                             words):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"], STEPS) + f"guard: {guard}\n")
    code, _, err = cli_run("check", str(path))
    assert code == 2
    for word in words:
        assert word in err


@pytest.mark.parametrize("each, guard, words", [
    ("[export-onnx]", "{max_accuracy_drop: 0.05, baseline: input}",
     ["guard.baseline names artifact 0, which evaluate.each_step does not list", "add 'input'"]),
    ("[prune]", "{max_accuracy_drop: 0.05}",
     ["evaluate.each_step names 'prune', which is neither `input` nor a step", "export-onnx, quantize-onnx"]),
])
def test_each_step_names_what_the_recipe_has(tmp_path, cli_run, tiny_text_model, sst2_small, each, guard, words):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"], STEPS).replace(
        "evaluate: {", f"evaluate: {{each_step: {each}, ") + f"guard: {guard}\n")
    code, _, err = cli_run("check", str(path))
    assert code == 2 and all(word in err for word in words), err


def test_broken_guard_exits_1_and_keeps_everything(tmp_path, cli_run, tiny_text_model, sst2_small):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"], STEPS)
                    + "guard: {max_size_mb: 0.001}\nbundle: {formats: [onnx]}\n")
    code, out, err = cli_run("run", str(path), "--out", str(tmp_path / "run"))
    assert code == 1 and "exceeds max_size_mb 0.001" in err
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "guard_failed" and len(record["steps"]) == 2
    assert "max_size_mb" in (tmp_path / "run" / "report.md").read_text() and "FAILED" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "bundle" / "manifest.json").is_file()


def test_bundle_refuses_to_replace_a_non_bundle(tmp_path, cli_run, tiny_text_model, sst2_small):
    from compressor.testing import run_recipe

    run_recipe(recipe_text(tiny_text_model, None, sst2_small["eval"], "  - uses: export-onnx\n"), tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    code, _, err = cli_run("bundle", str(tmp_path / "run"), "--out", str(precious))
    assert code == 2 and "is not a bundle" in err
    assert (precious / "thesis.txt").read_text() == "do not delete"
    code, _, err = cli_run("bundle", str(tmp_path / "run"), "--out", str(tmp_path / "run" / "b"))
    assert code == 0, err
    code, _, err = cli_run("bundle", str(tmp_path / "run"), "--out", str(tmp_path / "run" / "b"))
    assert code == 0, err  # an earlier bundle is replaced


def test_a_budget_on_another_metric_reads_its_own_direction():
    from compressor.run.guard import check_guard
    from compressor.recipe.schema import GuardSpec

    # a language model: perplexity is the task's metric, the answers' accuracy another (higher is better)
    artifacts = [{"index": i, "name": n, "metric": "perplexity", "perplexity": p, "accuracy": a,
                  "higher_is_better": False, "size_bytes": 1}
                 for i, (n, p, a) in enumerate([("input", 27.6, 0.0), ("export-onnx", 28.5, 0.87),
                                                ("quantize-onnx", 29.0, 0.855)])]
    directions = {"accuracy": True, "perplexity": False}
    within = check_guard(GuardSpec(metrics={"accuracy": 0.02}, baseline="export-onnx"), artifacts, 1, directions)
    assert within["passed"] and within["checks"][0]["drop"] == pytest.approx(0.015)
    beyond = check_guard(GuardSpec(metrics={"accuracy": 0.01}), artifacts, 1, directions)
    assert beyond["failures"] == ["accuracy dropped by 0.0150 from export-onnx (0.8700 → 0.8550); the budget is 0.0100"]
    # from the input (accuracy 0.0) the answers improved: no drop
    assert check_guard(GuardSpec(metrics={"accuracy": 0.01}), artifacts, None, directions)["passed"]
    rose = check_guard(GuardSpec(metrics={"perplexity": 0.4}), artifacts, 1, directions)
    assert rose["failures"] == ["perplexity rose by 0.5000 from export-onnx (28.5000 → 29.0000); the budget is 0.4000"]
    missing = check_guard(GuardSpec(metrics={"accuracy": 0.01}), [dict(a, accuracy=None) for a in artifacts], 1,
                          directions)
    assert missing["unmeasured"] == ["guard.metrics.accuracy is set but the baseline has no measured accuracy"]


def test_a_metric_budget_runs_with_the_guard(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from compressor.testing import run_recipe

    text = recipe_text(tiny_text_model, None, sst2_small["eval"], STEPS) + (
        "guard: {metrics: {accuracy: 1.0}, baseline: export-onnx}\n")
    record = run_recipe(text, tmp_path)
    check = record["guard"]["checks"][0]
    assert check["check"] == "metrics.accuracy" and check["reference"] == record["artifacts"][1]["accuracy"]
    assert record["guard"]["passed"]
    assert "- accuracy drop from export-onnx:" in (tmp_path / "run" / "report.md").read_text()
