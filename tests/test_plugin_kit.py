"""compressor.testing as a plugin author gets it: the example plugin's own test suite, copied out of this
repository, runs against the installed compressor. Its real-data fixtures find the data through
COMPRESSOR_SHARED_DATA, and where there is none they skip saying why instead of failing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # installs and tests the example plugin package

REPO = Path(__file__).resolve().parent.parent


def _run_copy(tmp_path: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    copy = tmp_path / "elsewhere" / "compressor-lowrank"
    if not copy.exists():
        shutil.copytree(REPO / "examples" / "compressor-lowrank", copy,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    env = {**os.environ, "COMPRESSOR_SHARED_DATA": str(data), "COMPRESSOR_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests", *args],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=900)


def test_example_plugin_tests_skip_with_the_reason_without_data(tmp_path):
    result = _run_copy(tmp_path, tmp_path / "no-data")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "1 passed" in out and "skipped" in out and "error" not in out.lower().split("short test summary")[0]
    assert "COMPRESSOR_SHARED_DATA" in out and "sst2/train.tsv" in out  # the reason names what is missing


def test_example_plugin_tests_find_the_data_outside_the_repository(tmp_path):
    from compressor.testing import shared_data_dir

    result = _run_copy(tmp_path, shared_data_dir(), "-k", "bad_settings")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "skipped" not in out and " passed" in out, out[-3000:]
