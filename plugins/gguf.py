"""A GGUF file as a recipe's input model (`convert_input_model` hook): checked from its header, converted
to an `hf` directory once.

transformers reads GGUF (`from_pretrained(dir, gguf_file=NAME)`); asked to dequantize
(`GgufConfig(dequantize=True)`), it unpacks every tensor to float32. transformers 5 still treats such a
model as quantized and refuses to `save_pretrained` it, so its weights are moved into a plain model built
from the same config without the quantization settings, which saves like any checkpoint. The conversion
takes tens of seconds, so its result is cached under the step cache, keyed on the file's bytes and the
transformers version; the GGUF file itself is never written to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

from compressor.errors import InputError
from compressor.hookspecs import hookimpl

WHERE = "model.path"


def gguf_architecture(file: Path) -> str:
    """The `general.architecture` in a GGUF header (llama, qwen2, ...); InputError for a file that is no GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InputError(f"{file} is a GGUF file, and reading one needs the `gguf` package", where=WHERE,
                         hint="pip install gguf") from None
    try:
        field = GGUFReader(str(file)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, ValueError, IndexError, OSError) as exc:
        raise InputError(f"{file} is not a readable GGUF file ({type(exc).__name__}: {exc})", where=WHERE,
                         hint="give a .gguf file written by llama.cpp's converter, or a save_pretrained directory"
                         ) from None


def check_gguf(file: Path) -> str:
    """Refuse a GGUF whose architecture transformers cannot read; returns the architecture."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    architecture = gguf_architecture(file)
    readable = sorted(a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer"))
    if architecture not in GGUF_CONFIG_MAPPING or architecture in ("general", "tokenizer"):
        raise InputError(f"{file.name} holds a {architecture!r} model, which transformers cannot read from GGUF",
                         where=WHERE, hint=f"transformers reads GGUF files of: {', '.join(readable)}")
    return architecture


def converted_dir(file: Path, cache_root: Path) -> Path:
    """Where the conversion of `file` lives: keyed on its bytes and the transformers version."""
    import transformers

    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"gguf->hf float32 transformers {transformers.__version__}".encode())
    return cache_root / "artifacts" / digest.hexdigest()


def convert_gguf(file: Path, cache_root: Path, log=print) -> Path:
    """The float32 `hf` directory (model, tokenizer, chat template) converted from a GGUF file, made once."""
    check_gguf(file)
    out = converted_dir(file, cache_root)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"  converting {file.name} from GGUF to float32 safetensors (once; cached in {out.parent})")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = plain_model(load_dequantized(file, torch.float32))
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"transformers could not convert {file.name}: {type(exc).__name__}: {exc}", where=WHERE,
                         hint="check that the file is complete, or convert it yourself with save_pretrained") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_dequantized(file: Path, dtype: object) -> object:
    """The GGUF file's causal LM with every tensor unpacked to `dtype`."""
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype,
                                                quantization_config=GgufConfig(gguf_file=file.name, dequantize=True))


def plain_model(model: object) -> object:
    """A model of the same config without its quantization settings, holding `model`'s (dense) weights:
    one that `save_pretrained` writes as an ordinary float checkpoint."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or [k for k in missing if k not in tied]:
        raise ValueError(f"the dequantized weights do not fit the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    plain.generation_config = model.generation_config
    return plain.eval()


@hookimpl
def convert_input_model(path: str, cache_dir: str, log: Callable[[str], None]) -> str | None:
    """A `.gguf` file becomes its float32 `hf` directory; any other input is not this plugin's."""
    file = Path(path)
    if file.suffix != ".gguf" or not file.is_file():
        return None
    return str(convert_gguf(file, Path(cache_dir), log=log))
