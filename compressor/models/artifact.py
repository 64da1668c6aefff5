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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

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
INHERITED_INFO = ("max_length", "disabled_optimizers")


@dataclass
class ArtifactInfo:
    """What the step that made an artifact says about it, stored as `info` in artifact.json. Steps set it through
    `Artifact.derive(out_dir, key=value, ...)` and read it by attribute; a key that is not a field below (a
    plugin's own) lands in `extra`. Unset fields are None and are not written."""

    #: The longest input in tokens the model is fed (finetune's and distill's max_length); inherited.
    max_length: int | None = None
    #: Whether the recipe's input model carries the task's head (its config's architectures say so).
    has_head: bool | None = None
    #: The input model's config `model_type` (bert, llama, …).
    model_type: str | None = None
    #: How finetune trained it: full, lora or bitfit.
    method: str | None = None
    #: The subdirectory holding an unmerged PEFT adapter (finetune method lora, merge false).
    adapter: str | None = None
    #: How its weights are quantized (say `int8-dynamic-tuned`, `int4-rtn`, `torch-dynamic-int8`); None: float.
    quantized: str | None = None
    #: Modules a quantizer left in float.
    skip_modules: list[str] | None = None
    #: A float precision other than fp32 (`fp16`).
    precision: str | None = None
    #: The ONNX opset of the graph.
    opset: int | None = None
    #: Which exporter wrote the graph (torchscript, dynamo, genai-builder).
    exporter: str | None = None
    #: Fused operators optimize-onnx added, by type and count.
    fused: dict[str, int] | None = None
    #: onnxruntime graph optimizers a session leaves off when it loads this model (optimize-onnx measured the
    #: unfused form faster, say `SkipLayerNormFusion`); inherited, and written into bundles.
    disabled_optimizers: list[str] | None = None
    #: A TensorRT engine's build settings (its inputs and profiles).
    build: dict[str, Any] | None = None
    #: Keys a plugin set that are not fields above.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ArtifactInfo":
        """From artifact.json's flat `info` mapping (unknown keys into `extra`)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        values = dict(values or {})
        extra = {k: values.pop(k) for k in list(values) if k not in names}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping artifact.json stores: set fields and `extra`."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    # Reading by key (plugin API 1.1, when info was a dict) keeps working: `info.get("quantized")`.
    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key` (a field or an extra key), or `default`."""
        return self.to_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def keys(self) -> Any:
        """The keys that are set."""
        return self.to_dict().keys()

    def items(self) -> Any:
        """(key, value) of what is set."""
        return self.to_dict().items()


@dataclass
class Artifact:
    """A model directory with its format (a registered compressor.models.formats.Format), task and labels."""

    path: Path
    format: str
    task: str
    labels: list[str] = field(default_factory=list)
    info: ArtifactInfo = field(default_factory=ArtifactInfo)

    def __post_init__(self) -> None:
        if not isinstance(self.info, ArtifactInfo):
            self.info = ArtifactInfo.from_dict(self.info)

    @property
    def max_length(self) -> int:
        """The longest input in tokens this model is fed (set by the step that trained it, e.g. finetune's
        max_length); evaluators, calibration and bundles truncate to it."""
        return int(self.info.max_length or DEFAULT_MAX_LENGTH)

    @property
    def model_file(self) -> Path:
        """The single model file of an artifact whose format has one (every format but `hf`)."""
        from compressor.models.formats import format_named

        name = format_named(self.format).model_file
        if name is None:
            raise ValueError(f"an artifact in format {self.format!r} has no single model file")
        return self.path / name

    def save_meta(self) -> None:
        """Write `artifact.json` into the artifact directory."""
        meta = {"format": self.format, "task": self.task, "labels": self.labels, "info": self.info.to_dict()}
        (self.path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        """Read an artifact written by a step (its directory holds `artifact.json`)."""
        meta = json.loads((Path(path) / META_FILE).read_text())
        return cls(path=Path(path), **meta)

    def derive(self, path: Path, format: str | None = None, **info: Any) -> "Artifact":
        """A new artifact at `path` with this one's task and labels (for a step's output); what the model
        expects (INHERITED_INFO, e.g. max_length) carries over unless `info` sets it."""
        mine = self.info.to_dict()
        kept = {k: mine[k] for k in INHERITED_INFO if k in mine}
        return Artifact(path=Path(path), format=format or self.format, task=self.task,
                        labels=list(self.labels), info=ArtifactInfo.from_dict({**kept, **info}))


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
