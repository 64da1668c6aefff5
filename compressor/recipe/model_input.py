"""The recipe's input model: `model.path` resolved (a directory, `pkg:module/dir`, or a Hugging Face Hub id
already in the local cache), its weights checked (safetensors only, headers whole) and its config read,
without loading any weights."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path
from typing import Any

from compressor.errors import InputError, RecipeError
from compressor.models.artifact import TOKENIZER_VOCAB_FILES, Artifact
from compressor.models.formats import HF, ONNX, format_named


def resolve_model_path(spec: str, recipe_dir: Path) -> Path:
    """A model path from the recipe: relative to the recipe, or `pkg:MODULE/SUBDIR` inside an installed package."""
    if spec.startswith("pkg:"):
        module, _, sub = spec[4:].partition("/")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if not found or not found.submodule_search_locations:
            raise InputError(f"no installed Python package {module!r}", where="model.path",
                             hint=f"pip install the package that provides {module!r}")
        return Path(list(found.submodule_search_locations)[0]) / sub
    local = (recipe_dir / Path(spec).expanduser()).resolve()
    if not local.exists() and HUB_ID.fullmatch(spec):
        return resolve_hub_id(spec, local)
    return local


#: `org/name` or `org/name@revision`, as on the Hugging Face Hub (a path that exists locally wins).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]{1,128})?")


def resolve_hub_id(spec: str, local: Path) -> Path:
    """A Hub id resolved the way transformers resolves it: huggingface_hub's snapshot_download, which reads
    its own cache (HF_HOME / HF_HUB_CACHE) and honours HF_HUB_OFFLINE. Only the files compressor reads are
    fetched (config, safetensors weights, tokenizer), never pickles."""
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise InputError(f"{spec!r} is not a local directory, and huggingface_hub is not installed to resolve it "
                         "as a Hub id", where="model.path", hint="pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except LocalEntryNotFoundError:
        raise InputError(f"model directory {local} does not exist, and {spec!r} is not in the Hugging Face cache "
                         "(HF_HUB_OFFLINE is set, or the Hub cannot be reached)", where="model.path",
                         hint="fix the path (relative to the recipe), or download the model first "
                              "(huggingface-cli download ORG/NAME)") from None
    except RepositoryNotFoundError:
        raise InputError(f"model directory {local} does not exist, and {spec!r} is not a model on the Hub",
                         where="model.path", hint="fix the path (relative to the recipe), or check the Hub id"
                         ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputError(f"{spec!r} could not be resolved as a Hub id: {str(exc).splitlines()[0][:200]}",
                         where="model.path", hint="give a local directory, or check the id and the network"
                         ) from None


def check_safetensors(file: Path, where: str) -> None:
    """Read a safetensors file's header (not its tensors): refuse a corrupted or truncated file now,
    rather than when a step loads it minutes later."""
    size = file.stat().st_size
    hint = "the file is damaged: copy or save the model again"
    with open(file, "rb") as fh:
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise InputError(f"{file} is not a valid safetensors file (no readable header)", where=where, hint=hint)
        try:
            header = json.loads(fh.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
            raise InputError(f"{file} is not a valid safetensors file (its header is not valid)", where=where,
                             hint=hint) from None
    if 8 + length + end > size:
        raise InputError(f"{file} is truncated: it holds {size} bytes, its header describes {8 + length + end}",
                         where=where, hint=hint)


def inspect_model(path: Path, task: str, labels: list[str] | None) -> tuple[Artifact, dict[str, Any]]:
    """Describe the input model directory from its files alone (no weights are read)."""
    where = "model.path"
    if not path.exists():
        raise InputError(f"model directory {path} does not exist", where=where,
                         hint="give the directory of a save_pretrained model (relative to the recipe)")
    if not path.is_dir():
        raise InputError(f"{path} is not a directory", where=where, hint="give the model's directory, not a file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} has no config.json", where=where,
                         hint="point to a directory written by transformers' save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_file} is not valid JSON ({exc})", where=where) from None
    if (path / format_named(ONNX).model_file).is_file():
        fmt = ONNX
    elif any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        fmt = HF
    elif any((path / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise InputError(f"{path} holds pickled weights (pytorch_model.bin), which compressor does not load",
                         where=where, hint="re-save the model with save_pretrained(safe_serialization=True)")
    else:
        raise InputError(f"{path} has no model weights (model.safetensors or model.onnx)", where=where,
                         hint="point to a directory written by save_pretrained")
    if fmt == HF:
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights, where)
    if not any((path / n).is_file() for n in TOKENIZER_VOCAB_FILES):
        raise InputError(f"{path} has no tokenizer (tokenizer.json or vocab.txt)", where=where,
                         hint="save the tokenizer beside the model with tokenizer.save_pretrained(DIR)")
    architectures = config.get("architectures") or []
    from compressor.tasks import task_for

    has_head = task_for(task).has_head(architectures)
    if has_head:
        id2label = config.get("id2label") or {}
        model_labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
        if labels and labels != model_labels:
            raise RecipeError(f"model.labels {labels} differ from the model's own labels {model_labels}",
                              where="model.labels", hint="remove model.labels; the model's head defines them")
    else:
        model_labels = list(labels or [])
    artifact = Artifact(path=path, format=fmt, task=task, labels=model_labels,
                        info={"has_head": has_head, "model_type": config.get("model_type")})
    return artifact, config
