"""Artifacts: a model on disk, in a directory, with a format, a task and labels.

Every step reads one artifact and writes a new directory. The metadata of an artifact
made by a step lives in `artifact.json` inside its directory; the input model is a plain
directory described by the recipe, and is never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("hf", "onnx", "ort", "engine")
META_FILE = "artifact.json"
#: Every file of a tokenizer that a model directory may hold: copied whenever a step writes a new model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
#: The files that make a tokenizer loadable (one is enough); each is among TOKENIZER_FILES, so that what
#: `check` accepts as a tokenizer is what every step carries along.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                         "sentencepiece.bpe.model")
#: The longest input (in tokens) an artifact is fed when the step that made it does not say otherwise.
DEFAULT_MAX_LENGTH = 128
#: info keys that describe what a model expects rather than how it was made: a derived artifact keeps them.
INHERITED_INFO = ("max_length",)


@dataclass
class Artifact:
    """A model directory with its format (`hf`, `onnx`, `ort`, `engine`), task and labels."""

    path: Path
    format: str
    task: str
    labels: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        """The longest input in tokens this model is fed (set by the step that trained it, e.g. finetune's
        max_length); evaluators, calibration and bundles truncate to it."""
        return int(self.info.get("max_length") or DEFAULT_MAX_LENGTH)

    @property
    def model_file(self) -> Path:
        """The single model file of an `onnx`/`ort`/`engine` artifact."""
        names = {"onnx": "model.onnx", "ort": "model.ort", "engine": "model.engine"}
        return self.path / names[self.format]

    def save_meta(self) -> None:
        """Write `artifact.json` into the artifact directory."""
        meta = asdict(self)
        meta.pop("path")
        (self.path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        """Read an artifact written by a step (its directory holds `artifact.json`)."""
        meta = json.loads((Path(path) / META_FILE).read_text())
        return cls(path=Path(path), **meta)

    def derive(self, path: Path, format: str | None = None, **info: Any) -> "Artifact":
        """A new artifact at `path` with this one's task and labels (for a step's output); what the model
        expects (INHERITED_INFO, e.g. max_length) carries over unless `info` sets it."""
        kept = {k: self.info[k] for k in INHERITED_INFO if k in self.info}
        return Artifact(path=Path(path), format=format or self.format, task=self.task,
                        labels=list(self.labels), info={**kept, **info})


def hash_dir(path: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: Path) -> str:
    """sha256 of one file (the bundle runtime's function: host and device hash alike)."""
    from compressor.bundle.device.runtime import sha256

    return sha256(path)


def dir_size(path: Path) -> int:
    """Bytes on disk of every file under `path` (artifact.json and the report excluded)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name != META_FILE)


def copy_companions(artifact: "Artifact", out_dir: Path) -> None:
    """Copy everything beside an onnx artifact's model file (config, tokenizer) into out_dir; not the
    model, its external weights (`model.onnx_data`, which the step rewrites) or the artifact's metadata."""
    for file in Path(artifact.path).iterdir():
        if file.is_file() and file.suffix not in (".onnx", ".onnx_data", ".data") and file.name != META_FILE:
            shutil.copy2(file, Path(out_dir) / file.name)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Materialise `src` at `dst` with hard links where the filesystem allows, else copies. ONNX external
    weights are always copied: onnx refuses to read a data file with several hard links (a guard against
    hard-link attacks)."""
    def _link(s: str, d: str) -> None:
        if s.endswith((".data", ".onnx_data")):
            shutil.copy2(s, d)
            return
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=_link)
