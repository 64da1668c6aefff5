"""Artifact formats, registered like steps: what a format's model file is called, what runs it, and how a
bundle of it is made.

The core knows two formats of its own: `hf` (a transformers directory, what a recipe's model is or is turned
into, run by PyTorch) and `onnx` (one ONNX graph, run by ONNX Runtime). Every other format is contributed by
the plugin whose step writes it, through the `register_formats` hook, and the core asks the registered
`Format` instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from compressor.errors import RecipeError
    from compressor.models.artifact import Artifact

#: The transformers directory format: the recipe's input model and every PyTorch step's output.
HF = "hf"
#: One ONNX graph (model.onnx, weights inside or beside it): what export-onnx writes.
ONNX = "onnx"


@dataclass(frozen=True)
class Format:
    """One artifact format."""

    #: The name steps use in `accepts` / `produces` and artifact.json holds.
    name: str
    #: One line for `compressor plugins` and error messages.
    summary: str
    #: The single model file of the format (None: a whole directory, as `hf`).
    model_file: str | None = None
    #: Whether ONNX Runtime runs the model file: such artifacts are timed and bundled by compressor itself.
    onnxruntime: bool = False
    #: How a bundle of this format is made from an `onnx` artifact (the artifact, an empty directory → the new
    #: artifact); None: only an artifact already in this format is bundled in it.
    from_onnx: Callable[["Artifact", Path], "Artifact"] | None = None

    @property
    def bundleable(self) -> bool:
        """Whether a bundle (onnxruntime on the device) can hold a model of this format."""
        return self.onnxruntime


#: The core's own formats; plugins add theirs through `register_formats`.
CORE_FORMATS = (
    Format(HF, "a transformers model directory (safetensors), run by PyTorch"),
    Format(ONNX, "an ONNX graph, run by ONNX Runtime", model_file="model.onnx", onnxruntime=True),
)

_registered: dict[str, Format] = {f.name: f for f in CORE_FORMATS}


def reset() -> dict[str, Format]:
    """Forget plugin formats (a new host is being built); the registry with the core's formats only."""
    _registered.clear()
    _registered.update({f.name: f for f in CORE_FORMATS})
    return _registered


def register(fmt: Format) -> None:
    """Add a format (called by the host for each `register_formats` call)."""
    _registered[fmt.name] = fmt


def registered() -> dict[str, Format]:
    """Every known format by name."""
    return dict(_registered)


def format_named(name: str) -> Format:
    """The registered format `name`; an unknown one (an artifact made by a plugin that is now disabled) is
    described as a plain directory that nothing in compressor runs."""
    return _registered.get(name) or Format(name, f"format {name!r} (its plugin is not loaded)")


def bundle_formats() -> list[str]:
    """The formats a bundle can be written in."""
    return [f.name for f in _registered.values() if f.bundleable]



def bundle_format_errors(wanted: list[str], last: str, what: str) -> list["RecipeError"]:
    """Why bundles in the `wanted` formats cannot be written from a model in format `last` (made by `what`,
    e.g. "the last step"): RecipeErrors at `bundle.formats`, none when they can."""
    from compressor.errors import RecipeError

    known = bundle_formats()
    errors: list[RecipeError] = []
    for i, name in enumerate(wanted):
        if name not in known:
            errors.append(RecipeError(f"unknown bundle format {name!r}", where=f"bundle.formats[{i}]",
                                      hint=f"bundles are written in {', '.join(known)}"))
        elif name != last and not (last == ONNX and format_named(name).from_onnx):
            sources = sorted({ONNX, name}) if format_named(name).from_onnx else [name]
            article = "an" if sources[0][0] in "aeiou" else "a"
            errors.append(RecipeError(f"a bundle needs {article} {' or '.join(sources)} model but {what} gives {last}",
                                      where="bundle.formats", hint="end the steps with export-onnx, or remove bundle"))
    return errors
