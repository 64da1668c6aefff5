"""What makes a run reproducible: versions of Python, libraries and plugins, the machine, the seeds."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

LIBRARIES = ("torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
             "onnxruntime-gpu", "peft", "torch-pruning", "safetensors", "numpy", "pydantic", "pluggy")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Python, platform, CPU and the versions of every library that shapes results."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import os

    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "libraries": versions}
