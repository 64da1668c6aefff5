"""GPTQ (Frantar et al., 2022) for onnxruntime's MatMulNBits, the `quantize-onnx` int4 `algorithm: gptq`.

onnxruntime ships a GPTQ (`GPTQWeightOnlyQuantConfig`), but it keeps every calibration activation of every
MatMul and runs the solver in numpy: on SmolLM2-135M with 32 sequences it ran for more than 30 minutes on
2 cores without finishing (docs/results.md, LLM int4). This one streams: onnxruntime computes the MatMul inputs on the
model as quantized so far (two layers a pass, see INPUTS_PER_PASS), only their Gram matrices (the Hessians,
K×K) are kept, and torch runs the solver, a few seconds per model of that size. Each block of `block_size` weights along K gets the grid onnxruntime's min-max
quantizer would give the already-corrected weights, and the codes are packed in MatMulNBits' layout, so
the graph is what onnxruntime's own quantizer writes, with other codes. With an identity Hessian the result
is byte-for-byte onnxruntime's min-max quantization (a test checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

#: Hessian damping, as a fraction of its mean diagonal (the GPTQ paper's 1%)
DAMP = 0.01
#: columns solved together before the lazy update of the rest (the paper's 128)
LAZY_BLOCK = 128


def grid(block: Any, bits: int, symmetric: bool) -> tuple[Any, Any]:
    """Scale and zero point of each row of `block` (rows × weights of one quantization block), exactly as
    onnxruntime's MatMulNBits quantizer computes them: symmetric, the value of largest magnitude maps to the
    lowest code; asymmetric, the range [min(·, 0), max(·, 0)] spans all codes."""
    import torch

    if symmetric:
        half = 1 << (bits - 1)
        peak = block.gather(1, block.abs().argmax(1, keepdim=True))[:, 0]
        return peak / -half, torch.full_like(peak, half)
    top = (1 << bits) - 1
    low, high = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
    scale = (high - low) / top
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-low / safe).clamp(0, top)


#: range shrinks tried per block by `searched_grid` (100% down to 80% of min-max, GPTQ's own `mse` search)
SHRINKS = tuple(1 - i / 100 for i in range(0, 21))


def searched_grid(block: Any, bits: int, symmetric: bool, importance: Any) -> tuple[Any, Any]:
    """The min-max grid of each row of `block`, with its range shrunk by whichever of SHRINKS leaves the least
    squared rounding error weighted by `importance` (one value per column: the Hessian's diagonal), so a few
    outliers do not stretch the steps of the whole block. Values beyond the shrunk range clip to the end codes."""
    import torch

    scale, zero = grid(block, bits, symmetric)
    shrinks = torch.tensor(SHRINKS, dtype=block.dtype)[:, None]  # S × 1
    if symmetric:
        scales, zeros = scale[None, :] * shrinks, zero[None, :].expand(len(SHRINKS), -1)
    else:  # shrink the range about the zero point onnxruntime's grid puts there
        scales = scale[None, :] * shrinks
        low = -zero * scale
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        zeros = torch.round(-(low[None, :] * shrinks) / safe).clamp(0, (1 << bits) - 1)
    codes = _codes(block[None], scales[..., None], zeros[..., None], bits)
    error = (((codes - zeros[..., None]) * scales[..., None] - block[None]) ** 2 * importance).sum(-1)  # S × rows
    best = error.argmin(0)
    rows = torch.arange(block.shape[0])
    return scales[best, rows], zeros[best, rows]


def _codes(column: Any, scale: Any, zero: Any, bits: int) -> Any:
    import torch

    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(torch.where(scale == 0, torch.zeros_like(column), column / safe)) + zero).clamp(0, (1 << bits) - 1)


def refit_scales(weight: Any, codes: Any, scales: Any, zeros: Any, hessian: Any, block_size: int,
                 rows_at_once: int = 1024) -> Any:
    """The scales that, with these codes, leave the least output error tr((W - Ŵ) H (W - Ŵ)ᵀ) against the
    original weight (rows × K, the transposed MatMul weight): one least-squares solve per row over its blocks'
    scales, so the blocks of a row share out the error that GPTQ left. A row keeps its scales where the solve
    is not better (a block whose codes are all its zero point, say). Returns the new scales (rows × blocks)."""
    import torch

    n, k = weight.shape
    blocks = k // block_size
    hessian = hessian.double()
    h = hessian.reshape(blocks, block_size, blocks, block_size)
    eye = torch.eye(blocks, dtype=torch.float64)[None]
    out = scales.clone()
    for start in range(0, n, rows_at_once):
        end = min(start + rows_at_once, n)
        centred = (codes[start:end] - zeros[start:end].repeat_interleave(block_size, 1)).double()
        centred = centred.reshape(end - start, blocks, block_size)
        hc = torch.einsum("bicj,ncj->nbic", h, centred)  # H·(codes of block c), split by block
        gram = torch.einsum("nbi,nbic->nbc", centred, hc)  # rows × blocks × blocks
        w = weight[start:end].double()
        target = (centred * (w @ hessian).reshape(end - start, blocks, block_size)).sum(-1)
        old = scales[start:end].double()
        ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)[:, None, None]
        new = torch.linalg.solve(gram + ridge * eye, target + ridge[:, :, 0] * old)

        def error(s: Any) -> Any:
            e = w - (centred * s[..., None]).reshape(end - start, k)
            return ((e @ hessian) * e).sum(1)

        better = error(new) < error(old)
        out[start:end] = torch.where(better[:, None], new, old).to(scales.dtype)
    return out


def gptq(weight: np.ndarray, hessian: Any, bits: int, block_size: int, symmetric: bool,
         damp: float = DAMP, search: bool = False, refit: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a MatMul weight (K × N, as ONNX stores it) against the Hessian of its input (K × K).

    Columns of the transposed weight are rounded in order and each one's error is spread over the columns
    not yet rounded, weighted by the inverse Hessian (the paper's Cholesky form with lazy batch updates).
    With `search`, each block's range is shrunk where that lowers its Hessian-weighted rounding error
    (`searched_grid`); without, it is onnxruntime's min-max grid. Either is fitted to the block's weights as
    corrected so far. With `refit`, the scales are then solved for again, all of a row's blocks together,
    against the original weight (`refit_scales`). (Act-order with grids fixed beforehand, AutoGPTQ's static
    groups, was measured worse on SmolLM2: docs/results.md, LLM int4.)
    Returns codes (N × K, uint8), scales (N × K/block_size, float32) and zero points (N × K/block_size)."""
    import torch

    w = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float32)).clone()
    n, k = w.shape
    h = torch.as_tensor(hessian, dtype=torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    original = w.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    importance = torch.diag(h).float()
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.zeros((n, k), dtype=torch.float32)
    scales = torch.zeros((n, k // block_size), dtype=torch.float32)
    zeros = torch.zeros_like(scales)
    lazy = max(LAZY_BLOCK, block_size)  # a multiple of block_size: no quantization block spans two
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        part = w[:, start:end].clone()
        errors = torch.zeros_like(part)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % block_size == 0:  # the block's grid, from its weights as corrected so far
                block = part[:, i : i + block_size]
                scales[:, col // block_size], zeros[:, col // block_size] = (
                    searched_grid(block, bits, symmetric, importance[col : col + block_size]) if search
                    else grid(block, bits, symmetric))
            scale, zero = scales[:, col // block_size], zeros[:, col // block_size]
            q = _codes(part[:, i], scale, zero, bits)
            codes[:, col] = q
            error = (part[:, i] - (q - zero) * scale) / inv[i, i]
            part[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    if refit:
        scales = refit_scales(original, codes, scales, zeros, h, block_size)
    return codes.to(torch.uint8).numpy(), scales.numpy(), zeros.to(torch.uint8).numpy()


def pack(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block_size: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' layout: codes (N, blocks, bytes per block), element 2k in the low nibble at 4 bits;
    scales (N, blocks); zero points (N, blocks rounded up to whole bytes), two per byte at 4 bits."""
    n, k = codes.shape
    blocks = codes.reshape(n, k // block_size, block_size)
    if bits == 8:
        return np.ascontiguousarray(blocks), scales, zeros
    data = blocks[..., 0::2] | (blocks[..., 1::2] << 4)
    if zeros.shape[1] % 2:
        zeros = np.pad(zeros, ((0, 0), (0, 1)))
    return np.ascontiguousarray(data), scales, np.ascontiguousarray(zeros[:, 0::2] | (zeros[:, 1::2] << 4))


def replace_matmul(model: Any, node: Any, weight: np.ndarray, codes: np.ndarray, scales: np.ndarray,
                   zeros: np.ndarray, bits: int, block_size: int, symmetric: bool, accuracy_level: int) -> str:
    """Swap a MatMul for the MatMulNBits node onnxruntime's quantizer would write, with these codes (the same
    initializer and node names). Returns the new node's name."""
    from onnx import helper, numpy_helper

    graph = model.graph
    packed, scales, zero_points = pack(codes, scales, zeros, bits, block_size)
    weight_name = node.input[1]
    names = [node.input[0], f"{weight_name}_Q{bits}", f"{weight_name}_scales"]
    graph.initializer.extend([numpy_helper.from_array(packed, names[1]), numpy_helper.from_array(scales, names[2])])
    if not symmetric:
        names.append(f"{weight_name}_zero_points")
        graph.initializer.append(numpy_helper.from_array(zero_points, names[3]))
    k, n = weight.shape
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node("MatMulNBits", names, list(node.output), name=f"{node.name}_Q{bits}",
                           domain="com.microsoft", **attrs)
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, new)
    if not any(weight_name in other.input for other in graph.node):
        graph.initializer.remove(next(t for t in graph.initializer if t.name == weight_name))
    return new.name


def input_hessians(model: Any, source: Path, inputs: list[str], sequences: Iterable[list[int]],
                   threads: int) -> dict[str, Any]:
    """H = 2/n · XᵀX of each named MatMul input over the tokens of `sequences`, each run alone through
    `model` with onnxruntime. A copy whose only outputs are the named tensors is run, so the nodes after
    them are pruned at load. `source` is the model's file, whose folder gives a builder graph's cache sizes."""
    import onnxruntime as ort
    import torch
    from onnx import ModelProto, helper

    from compressor.bundle.device.generation_runtime import OnnxCausalLM

    augmented = ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    augmented.graph.output.extend([helper.make_empty_tensor_value_info(name) for name in inputs])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del augmented
    lm = OnnxCausalLM(source, session=session)
    sums: dict[str, Any] = {}
    tokens = 0
    for ids in sequences:
        arr = np.asarray([ids], np.int64)
        values = session.run(inputs, lm.feeds(arr, np.ones_like(arr), lm.empty_past(1)))
        for name, value in zip(inputs, values):
            x = torch.from_numpy(value.reshape(-1, value.shape[-1]))
            gram = (x.T @ x).double()  # float32 products of one sequence, summed over sequences in float64
            sums[name] = sums[name] + gram if name in sums else gram
        tokens += len(ids)
    return {name: 2 * gram / max(tokens, 1) for name, gram in sums.items()}


def round_to_nearest(symmetric: bool) -> Any:
    """awq.Dequantize by round to nearest on onnxruntime's min-max grid, in blocks along K (the Hessian is not used)."""
    def dequantize(weight: Any, hessian: Any, bits: int, block_size: int) -> Any:
        k, n = weight.shape
        blocks = weight.T.reshape(n * (k // block_size), block_size)
        step, zero = grid(blocks, bits, symmetric)
        return ((_codes(blocks, step[:, None], zero[:, None], bits) - zero[:, None]) * step[:, None]).reshape(n, k).T

    return dequantize


def gptq_dequantize(symmetric: bool, search: bool) -> Any:
    """`gptq` as awq.Dequantize: the dequantized K × N weight it writes (without refit), for AWQ's choice of α."""
    import torch

    def dequantize(weight: Any, hessian: Any, bits: int, block_size: int) -> Any:
        codes, scales, zeros = gptq(weight.numpy(), hessian, bits, block_size, symmetric, search=search)
        k, n = weight.shape
        blocks = codes.reshape(n, k // block_size, block_size).astype(np.float32) - zeros[..., None]
        return torch.from_numpy((blocks * scales[..., None]).reshape(n, k).T.copy())

    return dequantize


#: MatMul inputs solved per pass (a Llama layer has four: QKV, output, gate/up, down; so two layers a pass):
#: each pass measures its inputs on the model as quantized so far, so a layer compensates the errors of the
#: layers before it as well as its own (the paper's sequential order). Measured on SmolLM2 (KL to the float
#: model on two held-out WikiText windows, MatMuls only): every layer from the float model's inputs 0.372
#: against min-max's 0.408 (each layer's own error fell 3-5x, the model's hardly); on two other windows,
#: two layers a pass 0.236 in 228 s and one layer a pass 0.228 in 428 s, against min-max's 0.386.
INPUTS_PER_PASS = 8


def gptq_matmuls(model: Any, source: Path, nodes: list[str], eight_bit: set[str], sequences: list[list[int]],
                 block_sizes: tuple[int, int], symmetric: bool, accuracy_level: int, threads: int,
                 inputs_per_pass: int | None = None, search: bool = False, refit: bool = False,
                 awq: bool = False, protected: set[str] | None = None,
                 awq_alphas: list[float] | None = None) -> list[str]:
    """GPTQ every named MatMul of `model` (in place) at 4 bits, or 8 for those in `eight_bit`, in graph order,
    in blocks of `block_sizes` (the 4-bit one, the 8-bit one), against Hessians measured on
    `sequences` through the model as quantized so far (`search`, `refit`: see `gptq`). With `awq`, each group
    of MatMuls reading one RMSNorm is first scaled activation-aware (awq.py; weights in `protected` are left
    alone), and the α chosen for each scaled group is appended to `awq_alphas`.
    Returns the MatMulNBits nodes written."""
    import torch
    from onnx import numpy_helper

    from compressor.plugins.quantize_onnx.awq import awq_scale

    four_block, eight_block = block_sizes
    chosen = set(nodes)
    readers: dict[str, list[str]] = {}  # MatMul input → the chosen MatMuls reading it, in graph order
    for node in model.graph.node:
        if node.name in chosen:
            readers.setdefault(node.input[0], []).append(node.name)
    order = list(readers)
    inputs_per_pass = inputs_per_pass or INPUTS_PER_PASS
    written = []
    for start in range(0, len(order), inputs_per_pass):
        inputs = order[start : start + inputs_per_pass]
        hessians = input_hessians(model, source, inputs, sequences, threads)
        by_name = {n.name: n for n in model.graph.node}
        if awq:
            # the float product is unchanged by the scaling, so the pass's later Hessians stay valid
            for tensor in inputs:
                group = [by_name[n] for n in readers[tensor]]
                specs = [(8, eight_block) if n.name in eight_bit else (4, four_block) for n in group]
                scaled = awq_scale(model, tensor, group, hessians[tensor], specs, protected or set(),
                                   gptq_dequantize(symmetric, search))
                if scaled is not None:
                    s, alpha = scaled
                    s64 = s.double()
                    hessians[tensor] = torch.as_tensor(hessians[tensor]).double() / torch.outer(s64, s64)
                    if awq_alphas is not None:
                        awq_alphas.append(alpha)
        weights = {t.name: t for t in model.graph.initializer}
        for name in [n for i in inputs for n in readers[i]]:
            node = by_name[name]
            weight = numpy_helper.to_array(weights[node.input[1]])
            bits, block = (8, eight_block) if name in eight_bit else (4, four_block)
            codes, scales, zeros = gptq(weight, hessians[node.input[0]], bits, block, symmetric, search=search,
                                        refit=refit)
            written.append(replace_matmul(model, node, weight, codes, scales, zeros, bits, block, symmetric,
                                          accuracy_level))
    return written
