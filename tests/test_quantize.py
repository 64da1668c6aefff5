"""quantize-onnx modes (dynamic, static QDQ, int4) and convert-fp16 on a trained tiny classifier:
accuracy within bounds of the float ONNX model, sizes smaller, and bad settings caught by check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FLOAT_STEPS, recipe_text


@pytest.fixture(scope="module")
def trained(trained_tiny):
    """A fine-tuned tiny classifier exported to ONNX, and the cache that holds it (conftest)."""
    return trained_tiny


def _with_step(trained, name: str, step: str) -> dict:
    from compressor.testing import run_recipe

    tmp = trained["tmp"] / name
    tmp.mkdir()
    text = recipe_text(trained["model"], trained["data"]["train"], trained["data"]["eval"], FLOAT_STEPS + step,
                       labels=", labels: [negative, positive]")
    record = run_recipe(text, tmp, cache=trained["tmp"] / "cache")  # reuses finetune + export
    assert [s["cached"] for s in record["steps"][:2]] == [True, True]
    return record


@pytest.mark.parametrize("name,step,max_drop,max_size_ratio", [
    ("dynamic-pc", "  - uses: quantize-onnx\n    with: {mode: dynamic, per_channel: true}\n", 0.03, 0.5),
    ("static-minmax", "  - uses: quantize-onnx\n    with: {mode: static, calibration_rows: 64}\n", 0.04, 0.5),
    ("static-entropy", "  - uses: quantize-onnx\n    with: {mode: static, calibration: entropy, "
                       "calibration_rows: 32}\n", 0.04, 0.5),
    ("int4", "  - uses: quantize-onnx\n    with: {mode: int4, block_size: 16}\n", 0.04, 0.95),
    ("fp16", "  - uses: convert-fp16\n", 0.01, 0.6),
])
def test_quantized_accuracy_and_size(trained, name, step, max_drop, max_size_ratio):
    record = _with_step(trained, name, step)
    fp32, out = record["artifacts"][2], record["artifacts"][3]
    assert fp32["accuracy"] > 0.6  # the float model learned something worth keeping
    assert abs(out["accuracy"] - fp32["accuracy"]) <= max_drop
    assert out["size_bytes"] < max_size_ratio * fp32["size_bytes"]


def test_static_graph_is_qdq_and_keeps_fragile_ops_float(trained):
    import onnx

    record = _with_step(trained, "static-ops", "  - uses: quantize-onnx\n    with: {mode: static, calibration_rows: 16}\n")
    graph = onnx.load(str(Path(record["steps"][2]["path"]) / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear") / 2
    produced_by = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert all(produced_by.get(i) is None or produced_by[i].op_type != "DequantizeLinear" for i in node.input)
    # full 8-bit weights unless reduce_range is asked for: the largest weight maps to ±127 (7 bits: ±63)
    from onnx import TensorProto, numpy_helper

    assert record["steps"][2]["notes"]["reduce_range"] is False
    int8_weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == TensorProto.INT8
                    and len(t.dims) == 2]
    assert int8_weights and max(int(abs(w.astype(int)).max()) for w in int8_weights) == 127
    narrow = _with_step(trained, "static-narrow", "  - uses: quantize-onnx\n    with: {mode: static, "
                        "calibration_rows: 16, reduce_range: true}\n")
    narrow_weights = [numpy_helper.to_array(t) for t in _graph(narrow, 2).initializer
                      if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert max(int(abs(w.astype(int)).max()) for w in narrow_weights) <= 64


def test_int4_uses_matmulnbits(trained):
    import onnx

    record = _with_step(trained, "int4-ops", "  - uses: quantize-onnx\n    with: {mode: int4, block_size: 32}\n")
    graph = onnx.load(str(Path(record["steps"][2]["path"]) / "model.onnx")).graph
    weights = {t.name for t in graph.initializer}
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 6  # 6 weight MatMuls per layer, 2 layers
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_int4_embeddings_and_int8_gather_after_int4(trained):
    """int4 with op_types [Gather] blocks the embedding tables (GatherBlockQuantized); the edge
    recipe's pair — int4 MatMuls, then dynamic int8 on Gather only — keeps the accuracy close."""
    import onnx

    record = _with_step(trained, "int4-gather", "  - uses: quantize-onnx\n    with: {mode: int4, op_types: [Gather]}\n")
    graph = onnx.load(str(Path(record["steps"][2]["path"]) / "model.onnx")).graph
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) >= 3  # word, position, token-type tables
    assert not any(n.op_type == "MatMulNBits" for n in graph.node)
    record = _with_step(trained, "int4-then-gather", "  - uses: quantize-onnx\n    with: {mode: int4}\n"
                        "  - uses: quantize-onnx\n    with: {mode: dynamic, op_types: [Gather]}\n")
    graph = onnx.load(str(Path(record["steps"][3]["path"]) / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 12 and "MatMulInteger" not in ops
    float_acc, final = record["artifacts"][2]["accuracy"], record["artifacts"][4]
    assert final["size_bytes"] < record["artifacts"][3]["size_bytes"] and abs(final["accuracy"] - float_acc) <= 0.05


@pytest.mark.parametrize("step,words", [
    ("  - uses: quantize-onnx\n    with: {mode: int4, block_size: 48}\n", ["block_size 48 is not a power of two"]),
    ("  - uses: quantize-onnx\n    with: {mode: int4, block_size: 64}\n", ["does not divide the model's hidden_size 32"]),
    ("  - uses: quantize-onnx\n    with: {mode: int8}\n", ["steps[2] (quantize-onnx).with.mode"]),
    ("  - uses: quantize-onnx\n  - uses: quantize-onnx\n    with: {mode: int4, op_types: [Gather]}\n",
     ["steps[3] (quantize-onnx).with.op_types", "already int8 after steps[2]"]),
])
def test_bad_quantization_settings(tmp_path, cli_run, tiny_encoder, sst2_small, step, words):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_encoder, sst2_small["train"], sst2_small["eval"], FLOAT_STEPS + step,
                                labels=", labels: [negative, positive]"))
    code, _, err = cli_run("check", str(path))
    assert code == 2 and all(w in err for w in words), err


def test_static_without_calibration_data(tmp_path, cli_run, tiny_text_model, sst2_small):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"],
                                "  - uses: export-onnx\n  - uses: quantize-onnx\n    with: {mode: static}\n"))
    code, _, err = cli_run("check", str(path))
    assert code == 2 and "steps[1] (quantize-onnx)" in err and "needs train data" in err


def test_quantize_torch_roundtrip_equals_torch_ao(trained):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_runner
    from compressor.plugins.quantize_torch import quantize_dynamic
    from compressor.testing import run_recipe

    tmp = trained["tmp"] / "torch-int8"
    tmp.mkdir()
    steps = "  - uses: finetune\n    with: {epochs: 3, learning_rate: 2.0e-3}\n  - uses: quantize-torch\n"
    record = run_recipe(recipe_text(trained["model"], trained["data"]["train"], trained["data"]["eval"], steps,
                                    labels=", labels: [negative, positive]"), tmp, cache=trained["tmp"] / "cache")
    assert record["steps"][0]["cached"] is True
    float_row, int8_row = record["artifacts"][1], record["artifacts"][2]
    assert abs(int8_row["accuracy"] - float_row["accuracy"]) <= 0.03
    assert int8_row["size_bytes"] < float_row["size_bytes"]
    assert record["steps"][1]["notes"]["quantized_linear_layers"] == 2 * 6 + 1  # + pooler; classifier left float
    # the saved artifact reproduces torch.ao's quantized model exactly
    texts = ["a gripping , beautifully made film .", "the plot is thin ."]
    tok = AutoTokenizer.from_pretrained(record["steps"][0]["path"])
    reference = quantize_dynamic(AutoModelForSequenceClassification.from_pretrained(record["steps"][0]["path"]).eval(),
                                 ["classifier"])
    with torch.no_grad():
        expected = reference(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    runner = load_runner(Artifact.load(Path(record["steps"][1]["path"])), threads=1)
    assert abs(runner(runner.encode(texts)) - expected).max() < 1e-6


def _graph(record: dict, step: int):
    import onnx

    return onnx.load(str(Path(record["steps"][step]["path"]) / "model.onnx")).graph


def test_int4_tables_are_packed_uint8_with_identical_outputs(trained):
    """The step stores int4 embedding tables as uint8 pairs (onnxruntime's faster layout); the model's
    outputs are exactly those of onnxruntime's int4-typed tables."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from compressor.plugins.quantize_onnx import QuantizeOnnxConfig, blockwise_int4, pack_gather_tables

    record = _with_step(trained, "int4-packed", "  - uses: quantize-onnx\n    with: {mode: int4, op_types: [Gather]}\n")
    graph = _graph(record, 2)
    tables = {t.name: t for t in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert gathers and all(tables[n.input[0]].data_type == onnx.TensorProto.UINT8 for n in gathers)
    assert record["steps"][2]["notes"]["packed_gather_tables"] == len(gathers)

    int4 = blockwise_int4(onnx.load(str(Path(record["steps"][1]["path"]) / "model.onnx")),
                          QuantizeOnnxConfig(mode="int4", op_types=["Gather"]), ("Gather",)).model
    assert any(t.data_type == onnx.TensorProto.INT4 for t in int4.graph.initializer)
    packed = onnx.ModelProto()
    packed.CopyFrom(int4)
    assert pack_gather_tables(packed) == len(gathers)
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (int4, packed))
    rng = np.random.default_rng(0)
    for length in (1, 7, 30):
        feed = {"input_ids": rng.integers(0, 100, (2, length)), "attention_mask": np.ones((2, length), np.int64),
                "token_type_ids": np.zeros((2, length), np.int64)}
        feed = {i.name: feed[i.name] for i in a.get_inputs()}
        assert np.array_equal(a.run(None, feed)[0], b.run(None, feed)[0])


OPTIMIZE = "  - uses: optimize-onnx\n"


def test_optimize_onnx_fuses_and_keeps_the_logits(trained):
    """Every layer's attention becomes one Attention op, residual+LayerNorm SkipLayerNormalization and
    bias+GELU BiasGelu; the logits stay within the parity tolerance and the accuracy is unchanged."""
    record = _with_step(trained, "optimize", OPTIMIZE)
    notes = record["steps"][2]["notes"]
    assert notes["fused"] == {"Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
    assert notes["nodes_after"] < notes["nodes_before"] / 2 and notes["parity_max_abs_diff"] < 1e-4
    ops = [n.op_type for n in _graph(record, 2).node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops and "EmbedLayerNormalization" not in ops
    assert record["artifacts"][3]["accuracy"] == pytest.approx(record["artifacts"][2]["accuracy"], abs=0.006)


def test_optimized_graph_quantizes_to_qattention_and_packed_tables(trained):
    """The edge pair after optimize-onnx: dynamic int8 turns Attention into QAttention and the other
    weight MatMuls into MatMulInteger; int4 then blocks the embedding tables."""
    steps = (OPTIMIZE + "  - uses: quantize-onnx\n    with: {mode: dynamic, op_types: [MatMul, Attention], "
             "per_channel: true}\n  - uses: quantize-onnx\n    with: {mode: int4, op_types: [Gather]}\n")
    record = _with_step(trained, "optimize-quantize", steps)
    graph = _graph(record, 4)
    weights = {t.name for t in graph.initializer}
    ops = [n.op_type for n in graph.node]
    assert ops.count("QAttention") == 2 and "Attention" not in ops and ops.count("GatherBlockQuantized") >= 3
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    fp32, final = record["artifacts"][2], record["artifacts"][5]
    assert abs(final["accuracy"] - fp32["accuracy"]) <= 0.04 and final["size_bytes"] < 0.4 * fp32["size_bytes"]


def test_unfused_residual_layer_norm_stays_unfused_where_it_is_loaded(trained, tmp_path):
    """skip_layer_norm false: the file keeps Add + LayerNormalization, the artifact (and the int8 one made
    from it) names onnxruntime's SkipLayerNormFusion as disabled, and compressor's runner loads it so: its
    logits are those of a session without that fusion, bit for bit, while a default session would fuse the
    int8 graph's pairs again."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_runner
    from compressor.plugins.optimize_onnx import SKIP_LAYER_NORM_FUSION

    steps = ("  - uses: optimize-onnx\n    with: {skip_layer_norm: false}\n"
             "  - uses: quantize-onnx\n    with: {mode: dynamic, op_types: [MatMul, Attention]}\n")
    record = _with_step(trained, "optimize-unfused", steps)
    assert "SkipLayerNormalization" not in record["steps"][2]["notes"]["fused"]
    ops = [n.op_type for n in _graph(record, 2).node]
    assert ops.count("Attention") == 2 and ops.count("LayerNormalization") == 5  # embeddings + 2 per layer
    fused, int8 = (Artifact.load(Path(record["steps"][i]["path"])) for i in (2, 3))
    assert fused.info.disabled_optimizers == int8.info.disabled_optimizers == [SKIP_LAYER_NORM_FUSION]

    def loaded_ops(disabled: list[str]) -> list[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"loaded-{len(disabled)}.onnx")
        ort.InferenceSession(str(int8.model_file), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]

    assert "SkipLayerNormalization" in loaded_ops([])
    assert "SkipLayerNormalization" not in loaded_ops([SKIP_LAYER_NORM_FUSION])
    runner = load_runner(int8, 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    reference = ort.InferenceSession(str(int8.model_file), options, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=[SKIP_LAYER_NORM_FUSION])
    batch = runner.encode(["a gripping, funny film", "dull and far too long"])
    feed = {k: v.astype(np.int64) for k, v in batch.items() if k in {i.name for i in reference.get_inputs()}}
    assert np.array_equal(runner(batch), reference.run(None, feed)[0])
    assert record["artifacts"][3]["accuracy"] == pytest.approx(record["artifacts"][2]["accuracy"], abs=0.006)


def test_skip_layer_norm_auto_keeps_the_form_it_timed_faster(trained):
    """skip_layer_norm auto times both forms on this CPU and keeps one; what it reports matches the graph
    it wrote and what the artifact tells a session, and int8 quantization carries the choice along."""
    steps = ("  - uses: optimize-onnx\n    with: {skip_layer_norm: auto}\n"
             "  - uses: quantize-onnx\n    with: {mode: dynamic, op_types: [MatMul, Attention]}\n")
    record = _with_step(trained, "optimize-auto", steps)
    notes = record["steps"][2]["notes"]
    assert notes["skip_layer_norm"] in ("fused", "unfused") and notes["unfused_time_ratio"] > 0
    assert set(notes["batch1_ms"]) == {"fused", "unfused"} and min(notes["batch1_ms"].values()) > 0
    unfused = notes["unfused_time_ratio"] <= 0.95
    assert (notes["skip_layer_norm"] == "unfused") == unfused
    ops = [n.op_type for n in _graph(record, 2).node]
    assert ops.count("SkipLayerNormalization") == (0 if unfused else 4)
    for step in (2, 3):
        info = json.loads((Path(record["steps"][step]["path"]) / "artifact.json").read_text())["info"]
        assert ("disabled_optimizers" in info) == unfused
    assert notes["parity_max_abs_diff"] < 1e-4


def test_optimize_onnx_embed_layer_norm(trained):
    """embed_layer_norm also fuses the three lookups and their LayerNorm; the logits stay close."""
    record = _with_step(trained, "optimize-embed", "  - uses: optimize-onnx\n    with: {embed_layer_norm: true}\n")
    assert record["steps"][2]["notes"]["fused"]["EmbedLayerNormalization"] == 1
    assert record["steps"][2]["notes"]["parity_max_abs_diff"] < 1e-4
    assert record["artifacts"][3]["accuracy"] == pytest.approx(record["artifacts"][2]["accuracy"], abs=0.006)
