"""A measured choice of which MatMuls an int4 language model keeps at 8 bits: an experiment, not adopted
(bench/NOTES.md, session 8 of issue 15). `bench/int4_candidates.py` candidates 26 and 27 use it.

Each MatMul is rounded to 4 bits (onnxruntime's min-max grid, dequantized) and the KL divergence of the model's
next-token distributions from the float model's is measured on calibration text: what that MatMul costs at 4
bits, either alone in the float model (`alone`) or as the KL it takes away when left float while every other
MatMul is rounded (`leave-one-out`). MatMuls are then raised to 8 bits by cost per extra byte, dearest first,
while the quantized model stays within a fraction of the FP32 model's size. One onnxruntime session serves every
probe: the weights become graph inputs, so a probe swaps one array instead of building a session.

On SmolLM2 both choices lost to the named rule (every MLP down and QKV projection at 8 bits): WikiText-2 valid
+6.25% (alone) and +6.0% (leave-one-out) against +5.2% within the same 0.20x, so `quantize-onnx` takes
`int8_nodes` by name and this stays here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def nbits_bytes(k: int, n: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of the initializers MatMulNBits stores for a K × N weight: the codes (blocks along K, `bits` each),
    a float32 scale per block and, asymmetric, the zero points (two per byte at 4 bits, rows padded)."""
    blocks = -(-k // block_size)
    size = n * blocks * (block_size * bits // 8) + n * blocks * 4
    if not symmetric:
        size += n * (-(-blocks // 2) if bits == 4 else blocks)
    return size


def fake_quantize(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """`weight` (K × N, as ONNX stores a MatMul's) rounded to onnxruntime's min-max grid in blocks of
    `block_size` along K and dequantized: what MatMulNBits computes with, in float."""
    import torch

    from compressor.plugins.gptq import _codes, grid

    k, n = weight.shape
    rows = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32)).reshape(n * k // block_size, block_size)
    scale, zero = grid(rows, bits, symmetric)
    codes = _codes(rows, scale[:, None], zero[:, None], bits)
    return ((codes - zero[:, None]) * scale[:, None]).reshape(n, k).T.contiguous().numpy()


def matmul_costs(model: Any, source: Path, nodes: list[str], sequences: list[list[int]], block_size: int,
                 symmetric: bool, probe: str = "alone", threads: int = 0) -> dict[str, float]:
    """What each named MatMul of `model` costs at 4 bits: the KL divergence (nats per token, mean over the tokens
    of `sequences`) of the next-token distributions from the float model's. With `probe: alone`, the MatMul
    alone is rounded; with `probe: leave-one-out`, every named MatMul is rounded and the cost is what the KL
    falls by when this one alone is left float (its worth where the others' errors are). `source` is the
    model's file (its folder gives a builder graph's cache sizes)."""
    import onnxruntime as ort
    import torch
    from onnx import ModelProto, helper, numpy_helper

    from compressor.generation_runtime import OnnxCausalLM

    inputs_model = ModelProto()
    inputs_model.CopyFrom(model)
    graph = inputs_model.graph
    by_name = {n.name: n for n in graph.node}
    initializers = {t.name: t for t in graph.initializer}
    weights: dict[str, np.ndarray] = {}
    for name in nodes:
        tensor = initializers[by_name[name].input[1]]
        weights[tensor.name] = numpy_helper.to_array(tensor)
        graph.initializer.remove(tensor)
        graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.output[:]
    graph.output.append(helper.make_empty_tensor_value_info("logits"))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(inputs_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del inputs_model
    lm = OnnxCausalLM(source, session=session)
    feeds = []
    for ids in sequences:
        arr = np.asarray([ids], np.int64)
        feeds.append(lm.feeds(arr, np.ones_like(arr), lm.empty_past(1)))
    rounded = {w: fake_quantize(array, 4, block_size, symmetric) for w, array in weights.items()}
    base = weights if probe == "alone" else rounded

    def log_probs(feed: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> Any:
        return torch.log_softmax(torch.from_numpy(session.run(["logits"], {**feed, **values})[0][0]), -1)

    reference = [log_probs(feed, weights) for feed in feeds]
    probabilities = [ref.exp() for ref in reference]
    tokens = sum(len(ids) for ids in sequences)

    def kl(swapped: dict[str, np.ndarray]) -> float:
        return sum(float((p * (ref - log_probs(feed, {**base, **swapped}))).sum(dtype=torch.float64))
                   for feed, ref, p in zip(feeds, reference, probabilities)) / tokens

    everything = kl({}) if probe == "leave-one-out" else 0.0
    costs = {}
    for name in nodes:
        weight = by_name[name].input[1]
        costs[name] = (kl({weight: rounded[weight]}) if probe == "alone"
                       else everything - kl({weight: weights[weight]}))
    return costs


def choose_int8(costs: dict[str, float], extra_bytes: dict[str, int], room: int) -> list[str]:
    """Greedy knapsack: MatMuls by cost per extra byte, highest first, each taken while it fits in `room` bytes
    (one that does not fit is passed over for smaller ones). Those that cost nothing at 4 bits are never taken."""
    chosen, used = [], 0
    for name in sorted(costs, key=lambda n: (-costs[n] / max(extra_bytes[n], 1), n)):
        if costs[name] > 0 and used + extra_bytes[name] <= room:
            chosen.append(name)
            used += extra_bytes[name]
    return chosen


def probe_sequences(windows: list[list[int]], rows: list[list[int]], tokens: int) -> list[list[int]]:
    """About `tokens` calibration tokens for the probes, half from the text windows and half from the train rows
    where there are both (a window cut to fit), so that they read both kinds of text the model will meet."""
    parts = [part for part in (windows, rows) if part]
    out: list[list[int]] = []
    for part in parts:
        share, taken = tokens // len(parts), 0
        for ids in part:
            if taken >= share:
                break
            out.append(ids[: share - taken] if part is windows else ids)
            taken += len(out[-1])
    return out


def measured_int8_nodes(model_file: Path, config: Any, windows: list[list[int]], rows: list[list[int]],
                        budget: float, probe: str = "alone", probe_tokens: int = 1024) -> tuple[list[str], dict]:
    """The MatMuls of the ONNX model at `model_file` to keep at 8 bits under `config` (a QuantizeOnnxConfig for
    int4) within `budget` × the model's size, measured on `probe_tokens` of the calibration `windows` and
    `rows`. The room is what the budget leaves over the model with every MatMul at 4 bits, quantized here with
    quantize-onnx's int4 with min-max (the same bytes as GPTQ's). Returns the names and what was measured."""
    import tempfile

    import onnx
    from onnx import numpy_helper

    from compressor.plugins.quantize_onnx import _int4, tied_tables, untie_transposed_weights

    model = onnx.load(str(model_file))
    untie_transposed_weights(model)
    op_types = tuple(config.op_types or ("MatMul",))
    weights = {t.name: t for t in model.graph.initializer}
    candidates = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    # a tied head at 8 bits no longer shares the embedding's 4-bit table: that table is stored again
    tied = set(tied_tables(model, [n.name for n in candidates]).values()) if "Gather" in op_types else set()
    eight_block = config.int8_block_size or config.block_size
    extra = {}
    for node in candidates:
        k, n = numpy_helper.to_array(weights[node.input[1]]).shape
        four = nbits_bytes(k, n, 4, config.block_size, config.symmetric)
        extra[node.name] = (nbits_bytes(k, n, 8, eight_block, config.symmetric) - four
                            + (four if node.input[1] in tied else 0))
    with tempfile.TemporaryDirectory() as work:
        class Quiet:  # what _int4 reports into
            def report(self, **values: Any) -> None:
                pass

        all4 = Path(work) / "model.onnx"
        _int4(model_file, all4, config.model_copy(update={"algorithm": "minmax", "int8_nodes": []}), Quiet())
        allowed = int(budget * model_file.stat().st_size)
        room = allowed - all4.stat().st_size
    sequences = probe_sequences(windows, rows, probe_tokens)
    costs = matmul_costs(model, model_file, [n.name for n in candidates], sequences, config.block_size,
                         config.symmetric, probe)
    chosen = choose_int8(costs, extra, room)
    return chosen, {"budget_mb": round(allowed / 1e6, 2), "room_mb": round(room / 1e6, 2),
                    "used_mb": round(sum(extra[n] for n in chosen) / 1e6, 2), "probe": probe,
                    "probe_tokens": sum(len(s) for s in sequences), "chosen": len(chosen),
                    "candidates": len(candidates),
                    "cost_top": {n: round(c, 6) for n, c in sorted(costs.items(), key=lambda x: -x[1])[:8]}}
