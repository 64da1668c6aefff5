"""bench/int8_choice.py (a measured choice of 8-bit MatMuls for int4 LLMs, an experiment) against onnxruntime's
own quantizer and kernel: the bytes it stores, the values it computes with, the knapsack, the probe text, and
on a tiny Llama a choice that fits its budget."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.testing import bench_module


def _bench():
    return bench_module("int8_choice")


def _matmul_model(weight: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _quantized(weight: np.ndarray, bits: int, block: int, symmetric: bool):
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    quantizer = nbits.MatMulNBitsQuantizer(_matmul_model(weight), bits=bits, block_size=block,
                                           is_symmetric=symmetric, op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_byte_count_is_what_onnxruntimes_quantizer_stores(bits, symmetric):
    """K = 96 in blocks of 32 gives three blocks a row, so 4-bit zero points pad a half byte."""
    from onnx import numpy_helper

    nbits_bytes = _bench().nbits_bytes

    weight = np.random.default_rng(0).standard_normal((96, 40)).astype(np.float32)
    model = _quantized(weight, bits, 32, symmetric)
    stored = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert nbits_bytes(96, 40, bits, 32, symmetric) == stored


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_fake_quantized_weight_computes_what_matmulnbits_computes(symmetric):
    import onnxruntime as ort

    fake_quantize = _bench().fake_quantize

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((128, 24)).astype(np.float32)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    session = ort.InferenceSession(_quantized(weight, 4, 32, symmetric).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rounded = fake_quantize(weight, 4, 32, symmetric)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ rounded, rtol=1e-4, atol=1e-4)
    assert np.abs(rounded - weight).max() > 1e-3  # it did round


def test_the_knapsack_takes_the_dearest_per_byte_and_skips_what_does_not_fit():
    choose_int8 = _bench().choose_int8

    costs = {"a": 4.0, "b": 3.0, "c": 1.0, "d": 0.5, "free": 0.0}
    extra = {"a": 100, "b": 10, "c": 10, "d": 1, "free": 1}
    # per byte: b 0.3, d 0.5 (first), c 0.1, a 0.04; a does not fit after d, b and c
    assert choose_int8(costs, extra, 25) == ["d", "b", "c"]
    assert choose_int8(costs, extra, 121) == ["d", "b", "c", "a"]
    assert choose_int8(costs, extra, 0) == []


def test_the_probe_reads_half_text_windows_and_half_train_rows():
    probe_sequences = _bench().probe_sequences

    windows, rows = [[1] * 8, [2] * 8, [3] * 8], [[4] * 3, [5] * 3, [6] * 3]
    assert probe_sequences(windows, rows, 20) == [[1] * 8, [2] * 2, [4] * 3, [5] * 3, [6] * 3]
    assert probe_sequences(windows, [], 9) == [[1] * 8, [2]]
    assert probe_sequences([], rows, 4) == [[4] * 3, [5] * 3]
