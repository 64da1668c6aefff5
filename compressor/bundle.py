"""The deployable bundle: the final ONNX model, its tokenizer and labels, and a manifest with checksums."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from compressor import __version__
from compressor.artifact import Artifact, hash_file
from compressor.cache import write_json_atomic
from compressor.errors import InputError

MANIFEST_SCHEMA = 1
BUNDLED_FILES = ("tokenizer.json", "config.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt")


def write_bundle(artifact: Artifact, out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write the bundle into `out` (via a temporary directory renamed into place); returns the manifest."""
    if artifact.format not in ("onnx", "ort"):
        raise InputError(f"a bundle needs an onnx or ort model, the last artifact is {artifact.format}",
                         where="bundle", hint="end the recipe with export-onnx (and quantize-onnx)")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(artifact.model_file, tmp / artifact.model_file.name)
    for name in BUNDLED_FILES:
        if (artifact.path / name).is_file():
            shutil.copy2(artifact.path / name, tmp / name)
    final = record["artifacts"][-1]
    manifest = {
        "schema_version": MANIFEST_SCHEMA, "task": artifact.task, "labels": artifact.labels,
        "model": artifact.model_file.name, "compressor": __version__, "recipe_hash": record["recipe_hash"],
        "metrics": {k: final.get(k) for k in ("metric", final.get("metric") or "", "size_bytes", "latency") if k},
        "measured_on": record["environment"]["cpu"],
        "files": {p.name: {"size": p.stat().st_size, "sha256": hash_file(p)} for p in sorted(tmp.iterdir())},
    }
    write_json_atomic(tmp / "manifest.json", manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"path": str(out), "files": sorted(manifest["files"])}
