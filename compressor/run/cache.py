"""The step cache: finished artifacts stored by a key of input hash, step, version, config, data and seed.

Entries are written under a temporary name and renamed, so a killed run never leaves a
half-written entry that a later run could take for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

CACHE_ENV = "COMPRESSOR_CACHE_DIR"


def cache_root() -> Path:
    """`$COMPRESSOR_CACHE_DIR`, else `~/.cache/compressor`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compressor")


def make_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Cache:
    """Artifacts and metrics by key, under one root directory."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root else cache_root()
        self.enabled = enabled
        self.artifacts = self.root / "artifacts"
        self.metrics = self.root / "metrics"

    def artifact_dir(self, key: str) -> Path:
        """Where the finished artifact of this key lives."""
        return self.artifacts / key

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The entry record of a finished artifact, or None (a dir without its record is unfinished)."""
        if not self.enabled:
            return None
        record = self.artifacts / f"{key}.json"
        if record.is_file() and self.artifact_dir(key).is_dir():
            try:
                return json.loads(record.read_text())
            except ValueError:
                return None
        return None

    def temp_dir(self, key: str) -> Path:
        """A fresh temporary directory for a step to write into."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        tmp = self.artifacts / f".tmp-{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(self, key: str, tmp: Path, entry: dict[str, Any]) -> Path:
        """Rename the finished temporary directory into place, then write its record."""
        final = self.artifact_dir(key)
        if self.lookup(key) is not None:
            # another process (a parallel sweep variant) finished the same step first: keep its copy,
            # which runs may already be reading, and drop ours (same key, so the same content)
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_json_atomic(self.artifacts / f"{key}.json", entry)
        return final

    def remove_own_temps(self) -> None:
        """Remove this process's temporary directories: a run stopped by a signal anywhere between creating one
        and committing it (before its step started, say) leaves none behind."""
        for tmp in self.artifacts.glob(f".tmp-*-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temporary directories left by processes that no longer run."""
        for tmp in self.artifacts.glob(".tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)

    def get_metrics(self, key: str) -> dict[str, Any] | None:
        """Cached measurements of an artifact."""
        path = self.metrics / f"{key}.json"
        if self.enabled and path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                return None
        return None

    def put_metrics(self, key: str, value: dict[str, Any]) -> None:
        """Store measurements of an artifact."""
        self.metrics.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.metrics / f"{key}.json", value)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary name beside `path`, then rename it into place."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temporary name beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
