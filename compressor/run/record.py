"""What makes a run reproducible: versions of Python, libraries and plugins, the machine, the seeds."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

LIBRARIES = ("torch", "transformers", "huggingface_hub", "tokenizers", "onnx", "onnxscript", "onnxruntime",
             "onnxruntime-gpu", "onnxruntime-genai", "peft", "torch-pruning", "safetensors", "numpy", "pydantic",
             "pluggy")


def cpu_name() -> str:
    """The CPU model (compressor.run.cpu.cpu_model)."""
    from compressor.run.cpu import cpu_model

    return cpu_model()


def environment() -> dict[str, Any]:
    """Python, platform, CPU and the versions of every library that shapes results."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import os

    from compressor.run.cpu import int8_kernel_class

    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_name(),
            "int8_kernels": int8_kernel_class(), "cpu_count": os.cpu_count(), "libraries": versions}
