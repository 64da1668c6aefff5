"""text-generation on a tiny Llama (GQA, tied embeddings, ChatML) built from a config: SST-2 read as an
instruction task, fine-tuned, exported with a KV cache, quantized to int4 and bundled; perplexity on real
WikiText-2; the bad inputs refused at check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.testing import require_data
from conftest import llm_recipe

pytestmark = pytest.mark.slow  # a tiny LLM trained, exported and quantized once for the module


@pytest.fixture(scope="module")
def wikitext_slice(tmp_path_factory) -> Path:
    """The first 200 lines of the real WikiText-2 test file."""
    src = require_data("wikitext-2/test.txt") / "wikitext-2" / "test.txt"
    out = tmp_path_factory.mktemp("wikitext") / "test.txt"
    out.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:200]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama, sst2_small, wikitext_slice):
    """finetune → export-onnx → int4, with a bundle."""
    from compressor.testing import run_recipe

    tmp = tmp_path_factory.mktemp("tiny-llm")
    record = run_recipe(llm_recipe(tiny_llama, sst2_small, wikitext_slice, extra="bundle: {formats: [onnx]}\n"),
                        tmp, cache=tmp / "cache")
    return record, tmp / "run"


def test_the_prompt_is_masked_and_the_answer_ends_the_turn(tiny_llama):
    from transformers import AutoTokenizer

    from compressor.models.data import Example
    from compressor.tasks.text_generation import TextGeneration, chat_wrap

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    rows = [Example("Review: fine\nSentiment:", "positive", None), Example("plain text line", None)]
    batch = TextGeneration().collate(tokenizer, rows, {}, 64)
    prompt = chat_wrap(tokenizer, rows[0].text, None)
    answer = tokenizer("positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(prompt) + len(answer)
    assert prompt[:1] == [tokenizer.convert_tokens_to_ids("<|im_start|>")]  # the chat template was applied
    assert batch["input_ids"][0, :n].tolist() == prompt + answer
    assert batch["labels"][0, :n].tolist() == [-100] * len(prompt) + answer
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()
    plain = tokenizer("plain text line")["input_ids"]
    assert batch["labels"][1, : len(plain)].tolist() == plain  # plain text: every token counts


def test_finetune_teaches_the_answer_and_export_keeps_it(tiny_run):
    record, _ = tiny_run
    arts = {a["name"]: a for a in record["artifacts"]}
    assert arts["input"]["accuracy"] == 0.0  # the untrained model does not answer with a label
    answers = [e["answer"] for e in arts["finetune"]["examples"]]
    assert set(answers) <= {"positive", "negative"}
    assert arts["finetune"]["accuracy"] >= 0.45
    # ONNX with a KV cache: the same perplexity and the same greedy answers as PyTorch
    assert arts["export-onnx"]["perplexity"] == pytest.approx(arts["finetune"]["perplexity"], rel=1e-4)
    assert arts["export-onnx"]["accuracy"] == arts["finetune"]["accuracy"]
    steps = {s["uses"]: s for s in record["steps"]}
    assert steps["export-onnx"]["notes"]["parity_greedy_identical"] == "4/4"
    assert arts["export-onnx"]["metric"] == "perplexity" and arts["export-onnx"]["higher_is_better"] is False
    assert arts["export-onnx"]["perplexity_tokens"] == 1024


def test_int4_packs_the_matmuls_and_keeps_perplexity_close(tiny_run):
    import onnx

    record, run = tiny_run
    arts = {a["name"]: a for a in record["artifacts"]}
    model = onnx.load(str(Path(arts["quantize-onnx"]["path"]) / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    # the builder's packed qkv, o, gate, up, down in each of the 2 layers, and the tied LM head (untied for packing)
    assert ops.count("MatMulNBits") == 2 * 5 + 1 and ops.count("GatherBlockQuantized") == 1
    notes = next(s["notes"] for s in record["steps"] if s["uses"] == "quantize-onnx")
    # the builder's embedding reads the tied head's table through a Transpose: untied, then stored once
    assert notes["untied"] == ["/model/embed_tokens/Gather"] and len(notes["shared_tables"]) == 1
    # the tiny model is fine-tuned to answer one word, so its WikiText perplexity is huge and int4 moves it
    # by a tenth or so either way; what matters is that it stays of the same size
    assert arts["quantize-onnx"]["perplexity"] == pytest.approx(arts["export-onnx"]["perplexity"], rel=0.15)
    lat = arts["quantize-onnx"]["latency"]
    assert lat["prompt_tokens"] == 32 and lat["new_tokens"] == 16 and lat["decode_tokens_per_s"] > 0
    assert 10 < lat["peak_rss_mb"] < 1000  # the fresh process's own memory, not the test runner's


def test_spread_windows_cover_the_file_evenly_and_all_of_them_equal_the_first_tokens(tiny_run, wikitext_slice):
    import math

    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_tokenizer
    from compressor.tasks.generation_report import perplexity_sample
    from compressor.tasks.text_generation import _Model, perplexity, spread_perplexity, spread_window_starts

    assert spread_window_starts(1000, 100, 4) == [0, 200, 500, 700]
    assert spread_window_starts(1000, 100, 4, {200}) == [0, 300, 500, 700]
    assert spread_window_starts(250, 100, 9) == [0, 100]  # whole windows only, each once
    record, _ = tiny_run
    path = Path(next(a for a in record["artifacts"] if a["name"] == "export-onnx")["path"])
    model, tokenizer = _Model(Artifact.load(path), 2), load_tokenizer(path)
    tokens = len(tokenizer(wikitext_slice.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    whole = tokens // 64
    every = spread_perplexity(model, tokenizer, wikitext_slice, 10**6, 64)
    first = perplexity(model, tokenizer, wikitext_slice, whole * 64, 64)
    assert every["perplexity_windows"] == whole and every["perplexity_tokens"] == whole * 64 == first["perplexity_tokens"]
    assert every["perplexity"] == pytest.approx(first["perplexity"], rel=1e-9)
    some = spread_perplexity(model, tokenizer, wikitext_slice, 3, 64)
    nll = every["perplexity_window_nll"]
    picked = [nll[i] for i in (0, int(whole / 3), int(2 * whole / 3))]
    assert some["perplexity_window_nll"] == picked
    assert some["perplexity"] == pytest.approx(math.exp(sum(picked) / (3 * 63)), rel=1e-5)
    assert perplexity_sample(some) == f"3 windows of 64 tokens spread over its {tokens:,} (192 tokens)"


def test_the_generation_bundle_streams_what_the_evaluator_generated(tiny_run, cli_run):
    from compressor.bundle.device import runtime as bundle_runtime

    record, run = tiny_run
    bundle = run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["output"] == "generation" and (bundle / "generation_runtime.py").is_file()
    assert manifest["generation"]["prompt_format"].startswith("<|im_start|>user\n{prompt}")
    code, out, err = cli_run("verify", str(bundle))
    assert code == 0, err
    final = record["artifacts"][-1]
    predictor = bundle_runtime.Predictor(bundle)
    for example in final["examples"]:
        row = next(c for c in manifest["golden"] if c["input"].endswith(example["prompt"]))
        assert predictor.predict([row["input"]])[0]["text"].startswith(example["answer"])
    code, out, _ = cli_run("predict", str(bundle), manifest["golden"][0]["input"])
    assert code == 0 and out.strip() == predictor.predict([manifest["golden"][0]["input"]])[0]["text"]
    # a changed golden token is caught
    manifest["golden"][0]["tokens"][0] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle_runtime.BundleError, match="greedy tokens differ from token 0"):
        bundle_runtime.verify(bundle)


def test_the_guard_reads_perplexity_as_lower_is_better(tmp_path, tiny_llama, sst2_small, wikitext_slice, cli_run):
    steps = "  - uses: export-onnx\n    with: {atol: 1.0e-3}\n  - uses: quantize-onnx\n    with: {mode: int4}\n"
    path = tmp_path / "r.yaml"
    path.write_text(llm_recipe(tiny_llama, sst2_small, wikitext_slice, steps,
                               extra="guard: {max_accuracy_drop: 0.0, metrics: {accuracy: 0.0}}\n"))
    code, out, err = cli_run("run", str(path), "--out", str(tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    check, answers = record["guard"]["checks"][:2]
    first, last = record["artifacts"][0], record["artifacts"][-1]
    assert check["drop"] == pytest.approx(last["perplexity"] - first["perplexity"])
    # the answers' budget reads accuracy the other way: higher is better
    assert answers["metric"] == "accuracy" and answers["higher_is_better"] is True
    assert answers["drop"] == pytest.approx(first["accuracy"] - last["accuracy"])
    assert (code == 1) is (check["drop"] > 0 or answers["drop"] > 0)


@pytest.mark.parametrize("case, message", [
    ("chat", "has no chat template"),
    ("jsonl", "lacks 'prompt' or 'completion'"),
    ("gguf", "holds a 'bert' model, which transformers cannot read from GGUF"),
    ("eval-file", "does not exist"),
    ("eval-key", "evaluate.task.perplexity_tokenz"),
    ("trim-vocab", "trim-vocab supports WordPiece tokenizers (BERT family); this model's tokenizer is BPE"),
    ("prune", "layer index 5 is out of range: the model has 2 layers"),
    ("genai", "heads a multiple of 16 wide; this model's are 8"),
    ("family", "the GPTNeoXForCausalLM family is not one compressor exports with onnxruntime-genai's builder"),
    ("exporter", "decoder LLMs are exported by onnxruntime-genai's model builder (exporter: auto or "
                 "onnxruntime-genai), not torchscript"),
    ("int8", "mode 'dynamic' is not built for text-generation models yet"),
    ("gptq-text", "missing.txt does not exist"),
    ("clip-search", "clip_search is read by mode: int4 with algorithm: gptq only"),
    ("refit-scales", "refit_scales is read by mode: int4 with algorithm: gptq only"),
    ("int8-block", "int8_block_size is read for int8_nodes, and none are given"),
])
def test_bad_llm_inputs_exit_2_at_check(case, message, tmp_path, cli_run, tiny_llama, sst2_small, wikitext_slice):
    import shutil

    model, data, extra, corpus = tiny_llama, sst2_small, "", wikitext_slice
    if case == "chat":
        model = tmp_path / "plain"
        shutil.copytree(tiny_llama, model)
        (model / "chat_template.jinja").unlink()
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        extra = "  chat_template: true\n"
    text = llm_recipe(model, data, corpus, "  - uses: export-onnx\n", data_extra=extra)
    if case == "jsonl":
        rows = tmp_path / "rows.jsonl"
        rows.write_text('{"prompt": "hi", "completion": "there"}\n{"prompt": "no answer"}\n')
        text = (f"version: 1\nname: j\nmodel: {{path: {tiny_llama}, task: text-generation}}\n"
                f"data: {{format: jsonl, train: {rows}, text: prompt, label: completion}}\n"
                "steps:\n  - uses: finetune\n")
    if case == "gguf":
        from gguf import GGUFWriter

        file = tmp_path / "bert.gguf"
        writer = GGUFWriter(str(file), "bert")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        text = text.replace(f"path: {tiny_llama}", f"path: {file}")
    if case == "eval-file":
        text = text.replace(str(corpus), str(tmp_path / "missing.txt"))
    if case == "trim-vocab":
        text = text.replace("  - uses: export-onnx\n", "  - uses: trim-vocab\n")
    if case == "prune":
        text = text.replace("  - uses: export-onnx\n", "  - uses: prune\n    with: {keep_layers: [0, 5]}\n")
    if case in ("genai", "family"):
        model = tmp_path / "other"
        shutil.copytree(tiny_llama, model)
        config = json.loads((model / "config.json").read_text())
        config.update({"head_dim": 8} if case == "genai" else {"architectures": ["GPTNeoXForCausalLM"]})
        (model / "config.json").write_text(json.dumps(config))
        text = text.replace(f"path: {tiny_llama}", f"path: {model}")
    if case == "exporter":
        text = text.replace("  - uses: export-onnx\n", "  - uses: export-onnx\n    with: {exporter: torchscript}\n")
    if case == "int8":
        text = text.replace("  - uses: export-onnx\n", "  - uses: export-onnx\n  - uses: quantize-onnx\n"
                                                          "    with: {mode: dynamic}\n")
    if case == "gptq-text":
        text = text.replace("  - uses: export-onnx\n", "  - uses: export-onnx\n  - uses: quantize-onnx\n"
                                                          "    with: {mode: int4, algorithm: gptq, calibration_text: "
                                                          f"{tmp_path / 'missing.txt'}}}\n")
    if case == "clip-search":
        text = text.replace("  - uses: export-onnx\n", "  - uses: export-onnx\n  - uses: quantize-onnx\n"
                                                          "    with: {mode: int4, clip_search: true}\n")
    if case == "refit-scales":
        text = text.replace("  - uses: export-onnx\n", "  - uses: export-onnx\n  - uses: quantize-onnx\n"
                                                          "    with: {mode: int4, algorithm: minmax, refit_scales: true}\n")
    if case == "int8-block":
        text = text.replace("  - uses: export-onnx\n", "  - uses: export-onnx\n  - uses: quantize-onnx\n"
                                                          "    with: {mode: int4, int8_block_size: 128}\n")
    if case == "eval-key":
        text = text.replace("perplexity_tokens", "perplexity_tokenz")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli_run("check", str(path))
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_symbolic_cache_dimension_is_read_from_the_config_beside_the_model(tmp_path):
    from compressor.bundle.device.generation_runtime import _dim

    model = tmp_path / "model.onnx"
    assert _dim(3, model, "num_key_value_heads") == 3
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": 64,
                                                                                   "num_key_value_heads": 3}}}))
    assert _dim("kv_cache_dim", model, "head_dim") == 64
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "num_attention_heads": 9}))
    assert _dim("kv_cache_dim", model, "head_dim") == 64  # config.json first: 576 / 9
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 96, "num_attention_heads": 4}))
    assert _dim("kv_cache_dim", model, "head_dim") == 24
    (tmp_path / "config.json").unlink()
    (tmp_path / "genai_config.json").unlink()
    with pytest.raises(ValueError, match="head_dim symbolic"):
        _dim("kv_cache_dim", model, "head_dim")


def test_the_genai_builder_graph_keeps_the_model_and_int4_shares_its_tied_table(tmp_path, tiny_llama,
                                                                              sst2_small, wikitext_slice):
    """exporter: onnxruntime-genai writes fused attention (GroupQueryAttention); parity holds, the model's
    perplexity is PyTorch's, and int4 packs the embedding the builder reads through a Transpose and stores
    the tied table once; an 8-bit MatMul takes its own block size."""
    import onnx

    from compressor.testing import run_recipe

    steps = ("  - uses: export-onnx\n    with: {exporter: onnxruntime-genai, atol: 1.0e-3, parity_rows: 8}\n"
             "  - uses: quantize-onnx\n    with: {mode: int4, block_size: 16, op_types: [MatMul, Gather], "
             "int8_nodes: ['layers\\.0/mlp/down_proj'], int8_block_size: 32}\n")
    record = run_recipe(llm_recipe(tiny_llama, sst2_small, wikitext_slice, steps=steps), tmp_path,
                        cache=tmp_path / "cache")
    arts = {a["name"]: a for a in record["artifacts"]}
    notes = {s["uses"]: s["notes"] for s in record["steps"]}
    assert notes["export-onnx"]["parity_greedy_identical"] == "4/4"
    assert arts["export-onnx"]["perplexity"] == pytest.approx(arts["input"]["perplexity"], rel=1e-4)
    exported = onnx.load(str(Path(arts["export-onnx"]["path"]) / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in exported.graph.node].count("GroupQueryAttention") == 2
    assert notes["quantize-onnx"]["untied"] == ["/model/embed_tokens/Gather"]
    assert len(notes["quantize-onnx"]["shared_tables"]) == 1
    model = onnx.load(str(Path(arts["quantize-onnx"]["path"]) / "model.onnx"))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "MatMulNBits"}
    assert notes["quantize-onnx"]["int8_nodes"] == ["/model/layers.0/mlp/down_proj/MatMul"]
    assert bits.pop("/model/layers.0/mlp/down_proj/MatMul_Q8") == 8 and set(bits.values()) == {4}
    blocks = {n.name: next(a.i for a in n.attribute if a.name == "block_size") for n in model.graph.node
              if n.op_type == "MatMulNBits"}
    assert blocks.pop("/model/layers.0/mlp/down_proj/MatMul_Q8") == 32 and set(blocks.values()) == {16}
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    tables = [t for t in model.graph.initializer if t.dims and t.dims[0] == vocab]
    assert len(tables) == 2  # one packed int4 table and its scales, read by the LM head and the embedding
    # the tiny model is fine-tuned to answer one word, so its WikiText perplexity is huge and int4 moves it
    # by a tenth or so either way; what matters is that it stays of the same size
    assert arts["quantize-onnx"]["perplexity"] == pytest.approx(arts["export-onnx"]["perplexity"], rel=0.15)
    for name in ("export-onnx", "quantize-onnx"):
        _shared_buffer_decodes_as_copies_do(Path(arts[name]["path"]) / "model.onnx")


def _shared_buffer_decodes_as_copies_do(model_file: Path) -> None:
    """A builder graph's genai_config.json asks for past_present_share_buffer: decoding into one preallocated
    cache buffer per layer gives the logits that growing the cache by copies gives, token after token."""
    import numpy as np

    from compressor.bundle.device.generation_runtime import OnnxCausalLM

    shared, copied = OnnxCausalLM(model_file, threads=1), OnnxCausalLM(model_file, threads=1)
    copied.share_buffer = False
    assert shared.share_buffer
    prompt = [5, 17, 3, 9, 30, 2, 11]
    (a, cache_a), (b, cache_b) = shared.prefill(prompt, 20), copied.prefill(prompt, 20)
    assert cache_a.buffers is not None and cache_a.buffers[0].shape()[2] == 20 and cache_b.buffers is None
    for _ in range(12):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
        token = int(b.argmax())
        a, b = shared.decode(token, cache_a), copied.decode(token, cache_b)
    stop: set[int] = set()
    assert list(shared.stream(prompt, 12, stop)) == list(copied.stream(prompt, 12, stop))


def test_a_shared_table_computes_what_the_two_copies_computed(tiny_llama, tmp_path):
    """share_tied_tables only dedupes: the int4 model's logits are bit-identical before and after."""
    import numpy as np
    import onnx

    from compressor.bundle.device.generation_runtime import OnnxCausalLM
    from compressor.plugins.quantize_onnx import (QuantizeOnnxConfig, blockwise_int4, pack_gather_tables,
                                                  share_tied_tables, untie_transposed_weights)
    from compressor.export.onnx import build_with_genai

    build_with_genai(tiny_llama, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert untie_transposed_weights(model) == ["/model/embed_tokens/Gather"]
    config = QuantizeOnnxConfig(mode="int4", block_size=16, op_types=["MatMul", "Gather"])
    quantized = blockwise_int4(model, config, ("MatMul", "Gather")).model
    assert pack_gather_tables(quantized) == 1
    before = quantized.SerializeToString()
    assert len(share_tied_tables(quantized)) == 1
    after = quantized.SerializeToString()
    assert len(after) < len(before)
    ids = np.array([[5, 17, 42, 9, 100, 3]])
    logits = []
    for name, blob in (("two.onnx", before), ("shared.onnx", after)):
        (tmp_path / name).write_bytes(blob)  # beside genai_config.json, which gives the cache's dimensions
        lm = OnnxCausalLM(tmp_path / name, 1)
        logits.append(lm.forward(ids, np.ones_like(ids), lm.empty_past(1))[0])
    np.testing.assert_array_equal(logits[0], logits[1])


def test_gptq_on_a_tiny_llama_stays_closer_to_the_float_model_than_minmax(tiny_run, wikitext_slice, tmp_path):
    """The int4 step with algorithm: gptq (calibrated on one half of a WikiText slice, measured on the other):
    every MatMul becomes MatMulNBits, the tied table reads the head's GPTQ codes (one copy), and the
    next-token distributions are closer (KL) to the float export's than min-max's are."""
    import numpy as np
    import onnx

    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_tokenizer
    from compressor.bundle.device.generation_runtime import OnnxCausalLM
    from compressor.plugins.quantize_onnx import QuantizeOnnxConfig, _int4

    record, _ = tiny_run
    export = Artifact.load(next(Path(s["path"]) for s in record["steps"] if s["uses"] == "export-onnx"))
    ids = load_tokenizer(export.path)(wikitext_slice.read_text())["input_ids"]
    windows = [ids[i : i + 128] for i in range(0, len(ids) - 127, 128)]
    calibration, held_out = windows[: len(windows) // 2], windows[len(windows) // 2 :][:6]

    class Ctx:
        notes: dict = {}

        def report(self, **values):
            self.notes.update(values)

    def log_probs(path):
        lm = OnnxCausalLM(path, 1)
        out = np.concatenate([lm.forward(np.asarray([w]), np.ones((1, len(w)), np.int64), lm.empty_past(1))[0][0]
                              for w in held_out]).astype(np.float64)
        out -= out.max(-1, keepdims=True)
        return out - np.log(np.exp(out).sum(-1, keepdims=True))

    reference = log_probs(export.model_file)
    kl = {}
    for variant in ("minmax", "gptq", "gptq-awq"):
        folder = tmp_path / variant
        folder.mkdir()
        for f in export.path.glob("*.json"):
            (folder / f.name).write_bytes(f.read_bytes())
        ctx = Ctx()
        config = QuantizeOnnxConfig(mode="int4", block_size=16, op_types=["MatMul", "Gather"],
                                    algorithm=variant.split("-")[0], awq=variant.endswith("awq"))
        _int4(export.model_file, folder / "model.onnx", config, ctx, calibration)
        kl[variant] = float((np.exp(reference) * (reference - log_probs(folder / "model.onnx"))).sum(-1).mean())
        if variant != "minmax":
            model = onnx.load(str(folder / "model.onnx"))
            ops = [n.op_type for n in model.graph.node]
            weights = {w.name for w in model.graph.initializer}
            assert ops.count("MatMulNBits") == 2 * 5 + 1
            assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
            # with AWQ too the tied head is left unscaled, so the table still reads its codes
            assert ctx.notes["gptq_nodes"] == 11 and len(ctx.notes["shared_tables"]) == 1
    # at most the two norm-fed groups of each layer are scaled (QKV, gate/up; the tied head is not)
    assert 0 <= ctx.notes["awq_scaled_groups"] <= 2 * 2
    assert kl["gptq"] < 0.8 * kl["minmax"] and kl["gptq-awq"] < 0.8 * kl["minmax"], kl
