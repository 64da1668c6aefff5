"""Sweeps (matrix, shared prefixes, select, guard), the HTML report (Pareto front, rendered in
headless Chromium), `compressor report` over several runs, and the parallel and Ray executors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from compressor.report.html import pareto_front

pytestmark = pytest.mark.slow  # every sweep test runs several real variants

SWEEP = """version: 1
name: tiny-sweep
model: {{path: {model}, task: text-classification}}
data: {{format: tsv, train: {train}, eval: {eval}}}
matrix:
  ratio: [0.25, 0.5]
  mode: [dynamic, static]
steps:
  - uses: prune
    with: {{ratio: "${{{{ matrix.ratio }}}}"}}
  - uses: export-onnx
  - uses: quantize-onnx
    with: {{mode: "${{{{ matrix.mode }}}}"}}
evaluate: {{latency: {{runs: 3, warmup: 1, batch_sizes: [1]}}}}
guard: {{max_size_mb: {limit}}}
select: {select}
bundle: {{formats: [onnx]}}
"""


def _sweep(tmp_path: Path, model: Path, data: dict[str, Path], limit: float = 10.0, select: str = "smallest",
           **replace: str) -> Path:
    text = SWEEP.format(model=model, train=data["train"], eval=data["eval"], limit=limit, select=select)
    for old, new in replace.items():
        text = text.replace(old.replace("_", " "), new)
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_pareto_front():
    # (cost, quality): b beats a (cheaper, as good); c is the most accurate; d is dominated by b
    points = [(2.0, 0.80), (1.0, 0.80), (3.0, 0.90), (1.5, 0.70), (1.0, 0.75)]
    assert pareto_front(points) == [1, 2]
    assert pareto_front([(1.0, 0.5)]) == [0]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties dominate neither


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, tiny_text_model, sst2_small):
    """One 2×2 sweep, run with the local executor, with a size budget only the dynamic variants meet."""
    from click.testing import CliRunner

    from compressor.cli import cli

    from compressor.testing import cache_dir

    tmp = tmp_path_factory.mktemp("sweep")
    with cache_dir(tmp / "cache"):
        # a budget between the dynamic (QOperator) and static (QDQ) int8 sizes of the 25%-pruned model
        probe = _sweep(tmp, tiny_text_model, sst2_small)
        result = CliRunner().invoke(cli, ["run", str(probe), "--out", str(tmp / "probe")])
        assert result.exit_code == 0, result.stderr
        sizes = {v["name"]: v["final"]["size_bytes"] for v in
                 json.loads((tmp / "probe" / "sweep.json").read_text())["variants"]}
        limit = (max(sizes[k] for k in sizes if "dynamic" in k) + min(sizes[k] for k in sizes if "static" in k)) / 2e6
        recipe = _sweep(tmp, tiny_text_model, sst2_small, limit=limit)
        result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp / "run")])
    return tmp, result, sizes, limit


def test_sweep_runs_every_variant_shares_prefixes_and_selects(sweep_run):
    tmp, result, sizes, limit = sweep_run
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp / "run" / "sweep.json").read_text())
    names = [v["name"] for v in summary["variants"]]
    assert names == ["ratio-0.25_mode-dynamic", "ratio-0.25_mode-static", "ratio-0.5_mode-dynamic",
                     "ratio-0.5_mode-static"]
    status = {v["name"]: v["status"] for v in summary["variants"]}
    assert status == {n: ("ok" if "dynamic" in n else "guard_failed") for n in names}
    # the selected variant is the smallest of those that pass the guard, and it was bundled
    passing = {n: sizes[n] for n in names if status[n] == "ok"}
    assert summary["selected"] == min(passing, key=passing.get)
    assert summary["bundles"][0]["path"].endswith("bundle")
    from compressor.models.artifact import hash_file

    chosen = json.loads((tmp / "run" / "variants" / summary["selected"] / "record.json").read_text())
    assert hash_file(tmp / "run" / "bundle" / "model.onnx") == hash_file(Path(chosen["steps"][-1]["path"]) / "model.onnx")
    # variants sharing a prefix reuse its cached artifacts: in the first (probe) run, the static twin
    # of each ratio took prune and export-onnx from the cache and only quantized
    for name in ("ratio-0.25_mode-static", "ratio-0.5_mode-static"):
        record = json.loads((tmp / "probe" / "variants" / name / "record.json").read_text())
        assert [s["cached"] for s in record["steps"]] == [True, True, False]
    record = json.loads((tmp / "probe" / "variants" / "ratio-0.5_mode-dynamic" / "record.json").read_text())
    assert [s["cached"] for s in record["steps"]] == [False, False, False]
    for variant in names:
        assert (tmp / "run" / "variants" / variant / "report.html").is_file()


def test_sweep_report_has_the_front_and_every_variant(sweep_run):
    tmp, _, sizes, _ = sweep_run
    page = (tmp / "run" / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert page.count("data:image/png;base64,") == 2 + 4  # two scatters + one attribution chart per variant
    for name in sizes:
        assert name in page
    assert "★ " in page and "Selected: <b>" in page
    for png in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        assert (tmp / "run" / png).stat().st_size > 10_000


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine (apt install chromium)")
def test_report_renders_in_headless_chromium(sweep_run, tmp_path):
    """Chromium loads the page and paints it: the screenshot is a real picture, with the plots'
    colours in it (an empty page or broken images would be white and grey only)."""
    import numpy as np
    from PIL import Image

    tmp, _, _, _ = sweep_run
    shot = tmp_path / "shot.png"
    done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,1600",
                           (tmp / "run" / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1600, 1200)
    colourful = (np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])) > 60
    assert colourful.sum() > 500  # the plots' markers, the Pareto ring and the pass/fail colours
    assert (pixels.sum(-1) < 200).sum() > 2000  # and text


def test_guard_no_variant_passes_exits_1_with_the_report(tmp_path, cli_run, tiny_text_model, sst2_small):
    recipe = _sweep(tmp_path, tiny_text_model, sst2_small, limit=0.001)
    code, _, err = cli_run("run", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 1 and "none of the 4 variants passed the guard" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert summary["selected"] is None and not (tmp_path / "run" / "bundle").exists()
    assert (tmp_path / "run" / "report.html").is_file()
    for v in summary["variants"]:  # every variant's artifacts are still there
        record = json.loads((Path(v["run_dir"]) / "record.json").read_text())
        assert record["status"] == "guard_failed" and all(Path(s["path"]).is_dir() for s in record["steps"])


@pytest.mark.parametrize("edit, words", [
    ({"ratio: [0.25, 0.5]": "ratio: []"}, ["matrix.ratio", "non-empty list"]),
    ({"mode: [dynamic, static]": "mode: [dynamic, static]\n  speed: [1, 2]"}, ["matrix.speed", "used nowhere"]),
    ({"matrix.mode": "matrix.moda"}, ["steps[2] (quantize-onnx).with.mode", "matrix.moda", "names no matrix entry"]),
    ({"ratio: [0.25, 0.5]": "ratio: [0.25, 1.5]"}, ["variant ratio-1.5_mode-dynamic", "with.ratio"]),
    ({"select: smallest": "select: cheapest"}, ["select", "smallest, fastest, most_accurate"]),
    ({"guard: {max_size_mb": "guard: {max_accuracy_drop: 0.01, max_size_mb", "eval: ": "evl: "}, ["data.evl"]),
])
def test_bad_sweeps_exit_2_from_check(tmp_path, cli_run, tiny_text_model, sst2_small, edit, words):
    recipe = _sweep(tmp_path, tiny_text_model, sst2_small)
    text = recipe.read_text()
    for old, new in edit.items():
        assert old in text
        text = text.replace(old, new)
    recipe.write_text(text)
    code, _, err = cli_run("check", str(recipe))
    assert code == 2 and "Traceback" not in err, err
    for word in words:
        assert word in err


def test_empty_matrix_and_select_without_matrix(tmp_path, cli_run, tiny_text_model, sst2_small):
    recipe = _sweep(tmp_path, tiny_text_model, sst2_small)
    text = recipe.read_text()
    recipe.write_text(text.split("matrix:")[0] + "matrix: {}\n" + "steps:" + text.split("steps:")[1])
    code, _, err = cli_run("check", str(recipe))
    assert code == 2 and "the matrix is empty" in err
    plain = text.split("matrix:")[0] + "steps:\n  - uses: export-onnx\nselect: smallest\n"
    recipe.write_text(plain)
    code, _, err = cli_run("check", str(recipe))
    assert code == 2 and "select: needs a matrix" in err


def test_guard_on_a_metric_nothing_measures(tmp_path, cli_run, tiny_text_model, sst2_small):
    from conftest import recipe_text

    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], None, "  - uses: export-onnx\n",
                                  extra="guard: {max_accuracy_drop: 0.01}\n"))
    code, _, err = cli_run("check", str(recipe))
    assert code == 2 and "guard.max_accuracy_drop" in err and "no evaluator produces one" in err


def test_report_over_several_runs(sweep_run, tmp_path, cli_run):
    tmp, _, _, _ = sweep_run
    variants = tmp / "run" / "variants"
    code, out, err = cli_run("report", str(variants / "ratio-0.25_mode-dynamic"), str(variants / "ratio-0.5_mode-static"),
                             "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "ratio-0.25_mode-dynamic" in page and "ratio-0.5_mode-static" in page and "2 runs compared" in page
    code, _, err = cli_run("report", str(tmp_path / "nothing-here"))
    assert code == 2 and "not a run directory" in err


def _final_hashes(run_dir: Path) -> dict[str, list[str]]:
    summary = json.loads((run_dir / "sweep.json").read_text())
    return {v["name"]: [s["output_hash"] for s in json.loads((Path(v["run_dir"]) / "record.json").read_text())["steps"]]
            for v in summary["variants"]} | {"selected": [summary["selected"]]}


def test_parallel_jobs_give_the_local_results(sweep_run, tmp_path, tiny_text_model, sst2_small):
    """--jobs 2 in fresh processes with a fresh cache: the same artifacts, the same selection."""
    import os
    import sys

    tmp, _, _, limit = sweep_run
    recipe = _sweep(tmp_path, tiny_text_model, sst2_small, limit=limit)
    env = {**os.environ, "COMPRESSOR_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "compressor", "run", str(recipe), "--out", str(tmp_path / "run"),
                           "--jobs", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert _final_hashes(tmp_path / "run") == _final_hashes(tmp / "run")


def test_ray_executor_gives_the_local_results(sweep_run, tmp_path, tiny_text_model, sst2_small):
    """The same sweep as Ray tasks on a local Ray instance with 2 CPUs."""
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    import os
    import sys

    tmp, _, _, limit = sweep_run
    recipe = _sweep(tmp_path, tiny_text_model, sst2_small, limit=limit)
    env = {**os.environ, "COMPRESSOR_CACHE_DIR": str(tmp_path / "cache"), "COMPRESSOR_RAY_CPUS": "2"}
    done = subprocess.run([sys.executable, "-m", "compressor", "run", str(recipe), "--out", str(tmp_path / "run"),
                           "--executor", "ray"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray: 2 CPUs (local)" in done.stderr
    assert _final_hashes(tmp_path / "run") == _final_hashes(tmp / "run")
