"""What the CPU is: its model and the class of int8 kernels ONNX Runtime runs on it.

These describe a measurement, they never decide a setting: settings that depend on the CPU are
chosen by measuring (quantize-onnx `mode: auto`). They key the caches and are recorded with
every run and bundle, so that one CPU class's measurements are never handed to another.

ONNX Runtime's int8 GEMMs (MLAS) take one of these paths, chosen by the CPU's features. Measured
with onnxruntime 1.31 under qemu (bench/cpu_classes.py) on a MatMulInteger built to tell them apart:

- `x86-avx2` (and, by the same kernel, `x86-avx512` without VNNI): uint8 activations × int8 weights
  with `vpmaddubsw`, which saturates pairs of products at 16 bits (onnxruntime's "U8S8 saturation");
  uint8 × uint8 is exact;
- `x86-avxvnni`, `x86-avx512vnni`, `x86-amx`, `x86-sse`: exact int32 dot products;
- `arm64-dotprod` (`udot`/`sdot`), `arm64-i8mm` (`ummla`/`smmla`): exact; plain `arm64` NEON sums two
  int8 × int8 products in 16 bits, which wraps only for a weight of −128 (symmetric int8 weights stop
  at −127).
"""

from __future__ import annotations

import functools
import platform
import subprocess

from compressor.bundle.device.runtime import CLASS_ENV, cpu_flags, int8_kernel_class  # the device runtime's own copy

__all__ = ["CLASS_ENV", "cpu_flags", "cpu_model", "describe", "int8_kernel_class"]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU model name, else platform.processor(), else the machine type."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
            return value.strip()
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, str]:
    """{model, int8_kernels, machine}: what records, cache keys and bundles say about this CPU."""
    return {"model": cpu_model(), "int8_kernels": int8_kernel_class(), "machine": platform.machine()}
