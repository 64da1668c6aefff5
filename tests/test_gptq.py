"""GPTQ for MatMulNBits (plugins/quantize_onnx/gptq.py): onnxruntime's own layout and grid, and a smaller output error."""

from __future__ import annotations

import numpy as np
import pytest


def _ort_blocks(weight: np.ndarray, bits: int, block: int, symmetric: bool):
    """onnxruntime's min-max quantization of a K × N weight, in MatMulNBits' layout."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight.shape
    per_byte, blocks = 8 // bits, k // block
    packed = np.zeros((n, blocks, block // per_byte), np.uint8)
    zeros = np.zeros((n, (blocks + per_byte - 1) // per_byte), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, weight, scales, zeros, block, n, k,
                                                                    symmetric)
    return packed, scales, zeros


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_with_an_identity_hessian_gptq_is_onnxruntimes_minmax_byte_for_byte(bits, symmetric):
    """No correlation between inputs: nothing to compensate, so the codes, scales and zero points are
    exactly onnxruntime's, which checks the grid and the packing."""
    from compressor.plugins.quantize_onnx.gptq import gptq, pack

    weight = np.random.default_rng(0).standard_normal((256, 48)).astype(np.float32)
    expected = _ort_blocks(weight, bits, 32, symmetric)
    got = pack(*gptq(weight, np.eye(256), bits, 32, symmetric), bits, 32)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    if not symmetric:
        np.testing.assert_array_equal(got[2], expected[2])


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_the_output_error_on_unseen_inputs_of_the_same_kind(symmetric):
    """Correlated inputs (as a layer's are): the error XW − XQ on new inputs is well below min-max's."""
    from compressor.plugins.quantize_onnx.gptq import gptq

    rng = np.random.default_rng(1)
    k, n, block = 128, 64, 32
    mixing = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    seen, unseen = (rng.standard_normal((2000, k)).astype(np.float32) @ mixing for _ in range(2))
    weight = rng.standard_normal((k, n)).astype(np.float32)

    def dequantized(hessian):
        codes, scales, zeros = gptq(weight, hessian, 4, block, symmetric)
        blocks = codes.reshape(n, k // block, block).astype(np.float32) - zeros[..., None]
        return (blocks * scales[..., None]).reshape(n, k).T

    hessian = 2 * seen.T.astype(np.float64) @ seen / len(seen)
    error = np.linalg.norm(unseen @ weight - unseen @ dequantized(hessian))
    minmax = np.linalg.norm(unseen @ weight - unseen @ dequantized(np.eye(k)))
    assert error < 0.85 * minmax


#: the loud-channel problem's sizes: K, N and the quantization block
LOUD_K, LOUD_N, LOUD_BLOCK = 128, 64, 32


def _loud_channel_problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heavy-tailed weights (K × N) and inputs with a few loud, mixed channels: the weight, the Hessian of
    2,000 seen inputs, and 2,000 unseen inputs from the same distribution."""
    rng = np.random.default_rng(seed)
    k, n = LOUD_K, LOUD_N
    loud = np.ones(k, np.float32)
    loud[rng.choice(k, 6, replace=False)] = 8
    mixing = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    seen, unseen = ((rng.standard_normal((2000, k)).astype(np.float32) @ mixing) * loud for _ in range(2))
    weight = rng.standard_t(3, (k, n)).astype(np.float32)
    hessian = 2 * seen.T.astype(np.float64) @ seen / len(seen)
    return weight, hessian, unseen


def _gptq_on_unseen(weight: np.ndarray, hessian: np.ndarray, unseen: np.ndarray, **options):
    """4-bit symmetric GPTQ of `weight` in LOUD_BLOCK blocks: its codes, scales, and the output error on
    `unseen` inputs."""
    from compressor.plugins.quantize_onnx.gptq import gptq

    (k, n), block = weight.shape, LOUD_BLOCK
    codes, scales, zeros = gptq(weight, hessian, 4, block, True, **options)
    blocks = codes.reshape(n, k // block, block).astype(np.float32) - zeros[..., None]
    error = np.linalg.norm(unseen @ weight - unseen @ (blocks * scales[..., None]).reshape(n, k).T)
    return codes, scales, error


def test_searched_ranges_fit_heavy_tailed_weights_better():
    """Weights with heavy tails (a few large values stretch min-max's steps) and inputs with a few loud
    channels: searching each block's range lowers the error on new inputs, and the codes stay inside the
    grid, one grid per block."""
    weight, hessian, unseen = _loud_channel_problem(2)

    def error(**options):
        codes, scales, unseen_error = _gptq_on_unseen(weight, hessian, unseen, **options)
        assert codes.max() <= 15 and scales.shape == (LOUD_N, LOUD_K // LOUD_BLOCK)
        return unseen_error

    assert error(search=True) < 0.95 * error()


def test_refitted_scales_lower_the_output_error_on_new_inputs():
    """Solving each row's block scales again for the fixed codes (`refit`) lowers the output error on inputs
    GPTQ never saw, with min-max grids and with searched ones, and leaves the codes as they were."""
    weight, hessian, unseen = _loud_channel_problem(0)
    for search in (False, True):
        codes, _, plain = _gptq_on_unseen(weight, hessian, unseen, search=search)
        refit_codes, _, refit = _gptq_on_unseen(weight, hessian, unseen, search=search, refit=True)
        assert np.array_equal(codes, refit_codes)
        assert refit < (0.95 if not search else 0.99) * plain


def test_an_edited_calibration_or_distillation_text_file_changes_the_step_cache_key(tmp_path):
    """The steps key their cache on the text file's content, not only its name."""
    from compressor.plugins.distill import Distill, DistillConfig
    from compressor.plugins.quantize_onnx import QuantizeOnnx, QuantizeOnnxConfig

    text = tmp_path / "calibration.txt"
    configs = [(QuantizeOnnx(), QuantizeOnnxConfig(mode="int4", algorithm="gptq", calibration_text=str(text))),
               (Distill(), DistillConfig(text_file=str(text)))]
    for step, config in configs:
        text.write_text("one text\n")
        before = step.cache_extra(config)
        text.write_text("another text\n")
        assert step.cache_extra(config) != before and before is not None


def _norm_and_two_matmuls(gamma: np.ndarray, weights: list[np.ndarray]):
    """An RMSNorm (onnxruntime's SimplifiedLayerNormalization) whose output two MatMuls read, as in a Llama
    layer's gate and up projections."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weights[0].shape
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["normed"], name="norm", axis=-1,
                              epsilon=1e-6)]
    nodes += [helper.make_node("MatMul", ["normed", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(2)]
    graph = helper.make_graph(
        nodes, "awq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", k])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["t", n]) for i in range(2)],
        [numpy_helper.from_array(gamma, "gamma")] + [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    from compressor.models.loading import ort_session_from

    return ort_session_from(model.SerializeToString(), 1).run(None, {"x": x})


def test_awq_keeps_the_float_outputs_and_lowers_the_int4_error_on_new_inputs():
    """A norm whose gamma makes a few channels loud: AWQ picks α > 0, the float graph computes what it did
    (1/s folded into gamma), and after onnxruntime's own min-max int4 the outputs on unseen inputs are
    closer to the float ones than without the scaling."""
    from compressor.plugins.quantize_onnx import QuantizeOnnxConfig, blockwise_int4
    from compressor.plugins.quantize_onnx.awq import awq_scale
    from compressor.plugins.quantize_onnx.gptq import round_to_nearest

    rng = np.random.default_rng(3)
    k, n = 128, 64
    gamma = np.ones(k, np.float32)
    gamma[rng.choice(k, 6, replace=False)] = 10
    weights = [rng.standard_t(3, (k, n)).astype(np.float32) for _ in range(2)]
    seen, unseen = (rng.standard_normal((2000, k)).astype(np.float32) for _ in range(2))
    normed = seen / np.sqrt((seen ** 2).mean(-1, keepdims=True) + 1e-6) * gamma
    hessian = 2 * normed.T.astype(np.float64) @ normed / len(normed)

    plain, scaled = _norm_and_two_matmuls(gamma, weights), _norm_and_two_matmuls(gamma, weights)
    reference = _run(plain, unseen)
    group = [n for n in scaled.graph.node if n.op_type == "MatMul"]
    chosen = awq_scale(scaled, "normed", group, hessian, [(4, 32), (4, 32)], set(), round_to_nearest(True))
    assert chosen is not None and chosen[1] > 0
    for before, after in zip(reference, _run(scaled, unseen)):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-3)

    config = QuantizeOnnxConfig(mode="int4", block_size=32)
    errors = []
    for model in (plain, scaled):
        quantized = blockwise_int4(model, config, ("MatMul",)).model
        assert [n.op_type for n in quantized.graph.node].count("MatMulNBits") == 2
        errors.append(sum(np.linalg.norm(q - r) for q, r in zip(_run(quantized, unseen), reference)))
    assert errors[1] < 0.9 * errors[0], errors


def test_awq_leaves_a_group_alone_when_a_weight_is_shared_or_the_producer_is_no_norm():
    """A weight shared with an embedding table (protected) or an input not made by an RMSNorm: no scaling,
    the model untouched."""
    from compressor.plugins.quantize_onnx.awq import awq_scale
    from compressor.plugins.quantize_onnx.gptq import round_to_nearest

    rng = np.random.default_rng(4)
    gamma = rng.uniform(0.5, 4, 64).astype(np.float32)
    model = _norm_and_two_matmuls(gamma, [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(2)])
    before = model.SerializeToString()
    group = [n for n in model.graph.node if n.op_type == "MatMul"]
    hessian = np.diag(rng.uniform(0.1, 50, 64))
    assert awq_scale(model, "normed", group, hessian, [(4, 32)] * 2, {"w1"}, round_to_nearest(True)) is None
    assert awq_scale(model, "x", group, hessian, [(4, 32)] * 2, set(), round_to_nearest(True)) is None
    assert model.SerializeToString() == before


def test_awq_measures_gptq_and_round_to_nearest_alike_where_gptq_has_nothing_to_compensate():
    """With an identity Hessian GPTQ is min-max rounding, so the two objectives AWQ can choose α by give the
    same dequantized weights."""
    import torch

    from compressor.plugins.quantize_onnx.gptq import gptq_dequantize, round_to_nearest

    weight = torch.from_numpy(np.random.default_rng(5).standard_normal((128, 48)).astype(np.float32))
    eye = torch.eye(128, dtype=torch.float64)
    for bits in (4, 8):
        torch.testing.assert_close(gptq_dequantize(True, False)(weight, eye, bits, 32),
                                   round_to_nearest(True)(weight, eye, bits, 32), rtol=0, atol=1e-6)
