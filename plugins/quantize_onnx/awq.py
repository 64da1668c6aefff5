"""Activation-aware weight scaling (AWQ, Lin et al., 2023) before GPTQ, the `quantize-onnx` int4 `awq: true`.

The input channels of a MatMul whose activations run large matter most to its output; AWQ scales those
weight rows up by s (so the 4-bit grid resolves them more finely) and the input down by 1/s, which leaves the
float product unchanged. Here 1/s is folded into the RMSNorm that feeds the MatMuls (its gamma), so the graph
gains no node: the groups are the MatMuls reading one RMSNorm's output (a Llama layer's QKV and its gate/up
projections, and the head where it is not tied to the embedding table). s = a^α per input channel, with a the
channel's RMS on the calibration text (the square root of the Hessian's diagonal that GPTQ measures anyway)
and α the value of ALPHAS that leaves the least output error tr(ΔWᵀ H ΔW) once the scaled weights are
quantized at the MatMuls' own bits and blocks (by GPTQ itself in the step, round-to-nearest by default); α = 0 (no scaling) is among them, so a group is never scaled for the worse by
that measure. GPTQ then quantizes the scaled weights against the Hessian of the scaled input.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: the RMSNorm operators 1/s is folded into, and the input index of their gamma
RMS_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
#: exponents tried for s = a^α (AWQ's grid of 20 steps)
ALPHAS = tuple(i / 20 for i in range(21))


#: quantize-dequantize a scaled weight (K × N) against the Hessian of its scaled input, at (bits, block size)
Dequantize = Callable[[Any, Any, int, int], Any]


def rounding_error(weight: Any, scale: Any, hessian: Any, bits: int, block_size: int,
                   dequantize: Dequantize) -> float:
    """tr(ΔWᵀ H ΔW) of a MatMul weight (K × N) scaled by `scale` per input row, quantized by `dequantize`
    against the Hessian of the scaled input, and scaled back."""
    scaled_hessian = hessian / (scale[:, None].double() * scale[None, :].double())
    quantized = dequantize(weight * scale[:, None], scaled_hessian, bits, block_size)
    delta = (weight - quantized / scale[:, None]).double()
    return float(((hessian @ delta) * delta).sum())


def foldable_group(model: Any, tensor: str, readers: list[Any], protected: set[str]) -> Any | None:
    """The RMSNorm node whose output `tensor` is read by exactly these MatMuls, when 1/s can be folded into its
    gamma: the gamma and every MatMul weight belong to one node each, and no weight is in `protected` (weights
    shared with an embedding table). None otherwise."""
    graph = model.graph
    producer = next((n for n in graph.node if n.output and n.output[0] == tensor), None)
    if producer is None or producer.op_type not in RMS_NORMS:
        return None
    consumers = [n for n in graph.node if tensor in n.input]
    if len(consumers) != len(readers):
        return None
    initializers = {t.name for t in graph.initializer}
    gamma = producer.input[RMS_NORMS[producer.op_type]]
    names = [gamma] + [r.input[1] for r in readers]
    if gamma not in initializers or any(w in protected for w in names[1:]):
        return None
    if any(sum(name in n.input for n in graph.node) != 1 for name in names):
        return None
    return producer


def awq_scale(model: Any, tensor: str, readers: list[Any], hessian: Any, specs: list[tuple[int, int]],
              protected: set[str], dequantize: Dequantize) -> tuple[Any, float] | None:
    """Choose s for the MatMuls `readers` of `tensor` (each quantized at its (bits, block_size) in `specs`, by
    `dequantize`: gptq.round_to_nearest or gptq.gptq_dequantize) and fold it in place: gamma / s, weights · s.
    Returns (s, α), or None when the group cannot be folded or α = 0 is best."""
    import torch
    from onnx import numpy_helper

    producer = foldable_group(model, tensor, readers, protected)
    if producer is None:
        return None
    tensors = {t.name: t for t in model.graph.initializer}
    weights = [torch.from_numpy(numpy_helper.to_array(tensors[r.input[1]]).astype(np.float32)) for r in readers]
    h = torch.as_tensor(hessian, dtype=torch.float64)
    rms = torch.sqrt(torch.diag(h).clamp(min=0)).float()
    rms = rms.clamp(min=max(float(rms.max()) * 1e-6, 1e-12))
    best: tuple[float, float, Any] | None = None
    for alpha in ALPHAS:
        s = rms ** alpha
        s = s / torch.sqrt(s.max() * s.min())
        error = sum(rounding_error(w, s, h, bits, block, dequantize)
                    for w, (bits, block) in zip(weights, specs))
        if best is None or error < best[0]:
            best = (error, alpha, s)
    assert best is not None
    _, alpha, s = best
    if alpha == 0:
        return None
    gamma = tensors[producer.input[RMS_NORMS[producer.op_type]]]
    gamma.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(gamma) / s.numpy()).astype(np.float32), gamma.name))
    for reader, w in zip(readers, weights):
        tensor_proto = tensors[reader.input[1]]
        tensor_proto.CopyFrom(numpy_helper.from_array((w * s[:, None]).numpy(), tensor_proto.name))
    return s, alpha
