"""A run killed in the middle of a step resumes from the last finished step, leaving nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_dist, recipe_text

pytestmark = pytest.mark.slow  # real runs killed and resumed

SLOW_STEP = '''
import os, shutil, time
from compressor.hookspecs import hookimpl
from compressor.step import Step, StepConfig

class Slow(Step):
    name, summary, Config, accepts, produces = "slow", "Sleeps, then copies.", StepConfig, ("onnx",), "onnx"

    def run(self, artifact, config, ctx):
        (ctx.out_dir / "partial.bin").write_bytes(b"x" * 1000)
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
        for f in artifact.path.iterdir():
            if f.is_file() and f.name != "artifact.json":
                shutil.copy2(f, ctx.out_dir / f.name)
        return artifact.derive(ctx.out_dir)

@hookimpl
def register_steps(register):
    register(Slow)
'''


def _wait_for(predicate, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_sigkill_mid_step_then_resume(tmp_path, tiny_text_model, sst2_small):
    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "slowplug", "slowplug_mod", SLOW_STEP)
    cache = tmp_path / "cache"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                  "  - uses: export-onnx\n  - uses: slow\n  - uses: quantize-onnx\n"))
    env = {**os.environ, "PYTHONPATH": str(site), "COMPRESSOR_CACHE_DIR": str(cache), "SLOW_SECONDS": "120"}
    cmd = [sys.executable, "-m", "compressor", "run", str(recipe), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # export-onnx finished (its cache record exists) and slow is writing into its temporary dir
        _wait_for(lambda: len(list((cache / "artifacts").glob("*.json"))) == 1
                  and any((cache / "artifacts").glob(".tmp-*/partial.bin")), 120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert any((cache / "artifacts").glob(".tmp-*"))  # the killed step left its temporary dir
    assert not (tmp_path / "run" / "record.json").exists()

    env["SLOW_SECONDS"] = "0"
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert [s["cached"] for s in record["steps"]] == [True, False, False]
    assert not list((cache / "artifacts").glob(".tmp-*"))  # stale temporary dirs are cleaned
    slow_dir = Path(record["steps"][1]["path"])
    assert (slow_dir / "model.onnx").read_bytes() == (Path(record["steps"][0]["path"]) / "model.onnx").read_bytes()


def test_failing_step_exits_4_and_keeps_finished_steps(tmp_path, tiny_text_model, sst2_small):
    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "boomplug", "boomplug_mod", SLOW_STEP.replace("time.sleep(", "raise RuntimeError('boom'); (")
              .replace('"slow"', '"boom"'))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                  "  - uses: export-onnx\n  - uses: boom\n"))
    env = {**os.environ, "PYTHONPATH": str(site), "COMPRESSOR_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "compressor", "run", str(recipe), "--out", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4
    assert "steps[1] (boom)" in result.stderr and "RuntimeError: boom" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache" / "artifacts").glob(".tmp-*"))  # nothing half-written left
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and len(record["steps"]) == 1
