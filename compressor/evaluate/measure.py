"""Measurements every artifact gets whatever its task: size, parameters, latency, throughput."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from compressor.models.artifact import Artifact
from compressor.models.formats import HF, ONNX

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".ort", ".engine", ".data", ".onnx_data")


def model_bytes(artifact: Artifact) -> int:
    """Bytes of the weight files (tokenizer and metadata excluded)."""
    return sum(p.stat().st_size for p in Path(artifact.path).rglob("*")
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and "adapter" not in p.parts[-2:-1])


#: Inputs of quantized operators that hold scales and zero points (not weights), by position.
QUANT_METADATA_INPUTS = {"MatMulNBits": (2, 3), "GatherBlockQuantized": (2, 3), "MatMulInteger": (2, 3),
                         "DynamicQuantizeMatMul": (2, 3), "MatMulIntegerToFloat": (2, 3, 4, 5),
                         "QAttention": (3, 4, 6, 7), "DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2)}
#: How onnxruntime's quantizers name the scale and zero-point initializers they add.
QUANT_METADATA_SUFFIXES = ("_scale", "_scales", "_zero_point", "_zero_points")


def parameter_count(artifact: Artifact) -> int | None:
    """Number of weights, read from safetensors headers or ONNX initializers (no model is run)."""
    if artifact.format == HF:
        from safetensors import safe_open

        total = 0
        for file in Path(artifact.path).glob("*.safetensors"):
            with safe_open(str(file), framework="numpy") as fh:
                for key in fh.keys():
                    shape = fh.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    total += n
        return total
    if artifact.format == ONNX:
        import onnx
        import numpy as np

        model = onnx.load(str(artifact.model_file), load_external_data=False)
        # Count weights, not bytes or quantization metadata: blockwise 4-bit ops may store two weights
        # per uint8, and scales and zero points (per block, per channel) are not parameters.
        packed, metadata = {}, set()
        for node in model.graph.node:
            if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
                bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
                packed[node.input[1 if node.op_type == "MatMulNBits" else 0]] = 8 // bits
            metadata.update(node.input[k] for k in QUANT_METADATA_INPUTS.get(node.op_type, ()) if k < len(node.input))
        metadata |= {t.name for t in model.graph.initializer if t.name.endswith(QUANT_METADATA_SUFFIXES)}
        total = 0
        for t in model.graph.initializer:
            n = int(np.prod(t.dims))
            if n > 1 and t.name not in metadata:
                total += n * (packed.get(t.name, 1) if t.data_type == onnx.TensorProto.UINT8 else 1)
        return total
    return None


def latency(runner: Any, texts: list[Any], batch_sizes: list[int], runs: int, warmup: int) -> dict[str, Any]:
    """p50/p90 latency at the first batch size and throughput at each, on real rows cycled in order."""
    out: dict[str, Any] = {}
    for bs in batch_sizes:
        batches = []
        for i in range(max(1, runs)):
            start = (i * bs) % max(1, len(texts))
            chunk = (texts[start:] + texts[:start])[:bs]
            while len(chunk) < bs:
                chunk = chunk + texts[: bs - len(chunk)]
            batches.append(runner.encode(chunk))
        for b in batches[:warmup]:
            runner(b)
        times = []
        for b in batches:
            t0 = time.perf_counter()
            runner(b)
            times.append(time.perf_counter() - t0)
        times.sort()
        p50 = statistics.median(times)
        p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
        out[f"b{bs}"] = {"p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "throughput": bs / statistics.mean(times)}
    first = out[f"b{batch_sizes[0]}"]
    largest = out[f"b{max(batch_sizes)}"]
    out.update(p50_ms=first["p50_ms"], p90_ms=first["p90_ms"], throughput=largest["throughput"],
               throughput_batch=max(batch_sizes))
    return out
