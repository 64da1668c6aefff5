"""The sentence-embedding task on a tiny BERT built from a config, with slices of the real STS benchmark: pooling read
from the sentence-transformers files (checked against sentence-transformers itself) or refused, pooling inside the
ONNX graph, Spearman against scipy, fidelity, each bad input, CoSENT fine-tuning and MSE distillation, and a
bundle that verifies, answers as the evaluator measured and serves OpenAI's /v1/embeddings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor.testing import require_data

STS_COLUMNS = "[genre, source, year, id, score, sentence1, sentence2]"


def _sts_slice(src: Path, dst: Path, rows: int) -> Path:
    with open(src, encoding="utf-8") as fh:
        dst.write_text("".join(line for _, line in zip(range(rows), fh)), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def sts(tmp_path_factory) -> dict[str, Path]:
    """400 train, 150 dev and 200 test pairs of the real STS benchmark."""
    root = require_data("stsbenchmark/sts-train.csv", "stsbenchmark/sts-dev.csv", "stsbenchmark/sts-test.csv")
    d = tmp_path_factory.mktemp("sts")
    src = root / "stsbenchmark"
    return {"train": _sts_slice(src / "sts-train.csv", d / "train.csv", 400),
            "validation": _sts_slice(src / "sts-dev.csv", d / "dev.csv", 150),
            "eval": _sts_slice(src / "sts-test.csv", d / "test.csv", 200)}


def _words(paths: list[Path]) -> list[str]:
    return [w for p in paths for line in p.read_text(encoding="utf-8").splitlines()
            for w in " ".join(line.split("\t")[5:7]).replace(".", " .").replace(",", " ,").split()]


def _tiny_embedder(out: Path, words: list[str], mode: str = "mean", normalize: bool = True, seed: int = 0) -> Path:
    """A tiny BERT (hidden 32, 2 layers) saved in the sentence-transformers layout with `mode` pooling."""
    import torch
    from transformers import BertConfig

    from compressor.tasks.embedding_model import Pooling, SentenceEmbeddingModel
    from compressor.testing import build_tokenizer

    tok = build_tokenizer(words, out, lowercase=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    SentenceEmbeddingModel.from_config(config, Pooling(mode, normalize)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def embedder(tmp_path_factory, sts) -> Path:
    return _tiny_embedder(tmp_path_factory.mktemp("embedder"), _words(list(sts.values())))


def _recipe(model: Path, sts: dict[str, Path], steps: str, extra: str = "", model_extra: str = "",
            data: str = "") -> str:
    return (f"version: 1\nname: tiny-sts\nmodel: {{path: {model}, task: sentence-embedding{model_extra}}}\n"
            f"data:\n  format: tsv\n  columns: {STS_COLUMNS}\n  text: [sentence1, sentence2]\n  label: score\n"
            f"  train: {sts['train']}\n  validation: {sts['validation']}\n  eval: {sts['eval']}\n{data}"
            f"steps:\n{steps}evaluate: {{latency: {{runs: 5, warmup: 1, batch_sizes: [1, 8]}}}}\n{extra}")


def _encode(model_dir: Path, texts: list[str]) -> np.ndarray:
    """compressor's PyTorch embedding of `texts` (the task's model class)."""
    import torch

    from compressor.models.loading import load_tokenizer, load_torch_model

    model = load_torch_model(model_dir, "sentence-embedding")
    with torch.inference_mode():
        enc = load_tokenizer(model_dir)(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return model(**enc).sentence_embedding.numpy()


TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run on the grass .",
         "A man is playing the flute."]


@pytest.mark.parametrize("mode,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_pooling_is_read_from_the_sentence_transformers_files_and_matches_sentence_transformers(
        tmp_path, sts, mode, normalize):
    from sentence_transformers import SentenceTransformer

    from compressor.tasks.embedding_model import Pooling, read_pooling

    path = _tiny_embedder(tmp_path / "m", _words([sts["train"]]), mode, normalize, seed=1)
    assert read_pooling(path) == Pooling(mode, normalize)
    theirs = SentenceTransformer(str(path), device="cpu").encode(TEXTS)
    ours = _encode(path, TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # distill's hidden-state terms read the encoder's hidden states through the pooling model
    import torch

    from compressor.tasks.embedding_model import SentenceEmbeddingModel

    model = SentenceEmbeddingModel.from_pretrained(path).eval()
    ids = torch.tensor([[1, 5, 6, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.token_embeddings)


def test_spearman_equals_scipys_on_fixed_numbers_with_ties():
    from scipy.stats import spearmanr

    from compressor.tasks.sentence_embedding import spearman

    x = [0.9, 0.1, 0.5, 0.5, 0.3, 0.7, 0.7, 0.7, 0.2, 1.0]
    y = [4.8, 0.4, 2.5, 3.1, 2.5, 3.9, 3.0, 4.1, 0.4, 5.0]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.integers(0, 6, size=500)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_the_evaluator_scores_spearman_and_fidelity_against_the_input(tmp_path, sts, embedder):
    from scipy.stats import spearmanr

    from compressor.evaluate.base import EvalSettings
    from compressor.models.artifact import Artifact
    from compressor.models.data import DataSource
    from compressor.tasks.sentence_embedding import EmbeddingEvaluator

    other = _tiny_embedder(tmp_path / "other", _words(list(sts.values())), seed=7)
    rows = DataSource("tsv", {"eval": sts["eval"]}, ["sentence1", "sentence2"], "score",
                      columns=["genre", "source", "year", "id", "score", "sentence1", "sentence2"]).load("eval")
    assert len(rows) == 200 and isinstance(rows[0].text, tuple)
    settings = EvalSettings(latency=False, source=str(embedder))
    artifact = Artifact(path=other, format="hf", task="sentence-embedding", labels=[], info={})
    got = EmbeddingEvaluator().evaluate(artifact, rows, settings)
    a, b = _encode(other, [r.text[0] for r in rows]), _encode(other, [r.text[1] for r in rows])
    cos = (a * b).sum(1)
    assert got["spearman"] == pytest.approx(100 * spearmanr(cos, [float(r.label) for r in rows]).statistic, abs=1e-3)
    sentences = sorted({s for r in rows for s in r.text})
    mine, ref = _encode(other, sentences), _encode(embedder, sentences)
    assert got["fidelity"] == pytest.approx(float((mine * ref).sum(1).mean()), abs=1e-5)
    assert got["fidelity"] < 0.99  # another model is not faithful
    same = EmbeddingEvaluator().evaluate(Artifact(path=embedder, format="hf", task="sentence-embedding", labels=[],
                                                  info={}), rows, settings)
    assert same["fidelity"] == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, sts, embedder) -> dict[str, Any]:
    """export → optimize → int8 (mode: auto, on the dev pairs) → bundle, on the tiny embedder."""
    from compressor.testing import run_recipe

    tmp = tmp_path_factory.mktemp("sts-int8")
    steps = ("  - uses: export-onnx\n  - uses: optimize-onnx\n"
             "  - uses: quantize-onnx\n    with: {mode: auto, max_accuracy_drop: 2.0}\n")
    record = run_recipe(_recipe(embedder, sts, steps, "guard: {max_accuracy_drop: 5.0, metrics: {fidelity: 0.2}}\n"
                                "bundle: {formats: [onnx]}\n"), tmp, cache=tmp / "cache")
    return {"record": record, "run": tmp / "run"}


def test_the_export_has_pooling_in_the_graph_equal_to_pytorchs(int8_run, embedder):
    import onnx

    from compressor.models.loading import load_tokenizer, ort_session

    record = int8_run["record"]
    assert record["status"] == "ok", record.get("error")
    exported = Path(record["artifacts"][1]["path"])
    graph = onnx.load(str(exported / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["sentence_embedding"]
    assert {n.op_type for n in graph.node} >= {"ReduceSum", "Div"}  # the mean pooling, in the graph
    session = ort_session(exported / "model.onnx", 1)
    enc = load_tokenizer(embedder)(TEXTS, padding=True, return_tensors="np")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    np.testing.assert_allclose(session.run(None, feeds)[0], _encode(embedder, TEXTS), atol=1e-5)
    steps = {s["uses"]: s for s in record["steps"]}
    assert steps["export-onnx"]["notes"]["parity_max_abs_diff"] < 1e-4
    final = record["artifacts"][-1]
    assert final["metric"] == "spearman" and 0.8 <= final["fidelity"] <= 1.0
    assert record["artifacts"][0]["fidelity"] == pytest.approx(1.0, abs=1e-6)


def test_a_bundle_verifies_and_embeds_as_the_evaluator_measured(int8_run, tmp_path):
    from compressor.bundle.device.runtime import Predictor, verify
    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_runner

    bundle = int8_run["run"] / "bundle"
    result = verify(bundle)
    assert result["golden"] == 4 and result["max_abs_diff"] == 0.0
    final = Artifact.load(Path(int8_run["record"]["artifacts"][-1]["path"]))
    runner = load_runner(final, 1)
    for text in TEXTS:  # one at a time: dynamic int8 quantizes activations per batch
        want = runner(runner.encode([text]))[0]
        got = Predictor(bundle).predict([text])[0]
        np.testing.assert_allclose(got["embedding"], want, atol=1e-6)
    out = subprocess.run([sys.executable, str(bundle / "predict.py"), TEXTS[0], TEXTS[3]], capture_output=True,
                         text=True, cwd=tmp_path, check=True).stdout.splitlines()
    shape, cosine = json.loads(out[0]), json.loads(out[1])
    assert shape["shape"] == [2, len(want)]
    a, b = (np.asarray(Predictor(bundle).predict([t])[0]["embedding"]) for t in (TEXTS[0], TEXTS[3]))
    assert cosine["cosine_similarity"] == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                                                        abs=1e-5)


def test_on_another_int8_class_the_measured_tolerance_applies(int8_run, tmp_path, monkeypatch):
    from compressor.bundle.device.runtime import CLASS_ENV, BundleError, int8_kernel_class, verify
    from compressor.tasks.sentence_embedding import OTHER_CLASS_TOLERANCE

    bundle = tmp_path / "bundle"
    shutil.copytree(int8_run["run"] / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tolerance_other_class"] == OTHER_CLASS_TOLERANCE and manifest["tolerance"] == 1e-3
    manifest["golden"][0]["logits"][5] += 0.6 * OTHER_CLASS_TOLERANCE  # what another class's kernels may give
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"golden\[0\]"):
        verify(bundle)  # on the class that made the golden outputs, 1e-3 holds
    other = "arm64" if int8_kernel_class() != "arm64" else "x86-avx2"
    monkeypatch.setenv(CLASS_ENV, other)
    result = verify(bundle)
    assert result["other_class"] and result["tolerance"] == OTHER_CLASS_TOLERANCE
    manifest["golden"][0]["logits"][5] += OTHER_CLASS_TOLERANCE
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"golden\[0\]"):
        verify(bundle)


def test_a_changed_golden_embedding_fails_verify(int8_run, tmp_path):
    from compressor.bundle.device.runtime import BundleError, verify
    from compressor.models.artifact import hash_file

    bundle = tmp_path / "bundle"
    shutil.copytree(int8_run["run"] / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["golden"][1]["logits"][3] += 0.01
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"golden\[1\]"):
        verify(bundle)
    assert hash_file(bundle / "model.onnx") == hash_file(int8_run["run"] / "bundle" / "model.onnx")


def test_finetune_with_cosent_raises_spearman_and_writes_the_sentence_transformers_files(tmp_path, sts, embedder):
    from sentence_transformers import SentenceTransformer

    from compressor.testing import run_recipe

    steps = "  - uses: finetune\n    with: {epochs: 4, batch_size: 16, learning_rate: 1.0e-3, max_length: 64}\n"
    record = run_recipe(_recipe(embedder, sts, steps), tmp_path, cache=tmp_path / "cache")
    assert record["status"] == "ok", record.get("error")
    before, after = record["artifacts"][0]["spearman"], record["artifacts"][1]["spearman"]
    assert after > before + 5, (before, after)
    tuned = Path(record["artifacts"][1]["path"])
    np.testing.assert_allclose(SentenceTransformer(str(tuned), device="cpu").encode(TEXTS), _encode(tuned, TEXTS),
                               atol=1e-5)


def test_distill_brings_a_pruned_model_back_to_its_teacher(tmp_path, sts, embedder):
    from compressor.testing import run_recipe

    steps = ("  - uses: finetune\n    with: {epochs: 4, batch_size: 16, learning_rate: 1.0e-3, max_length: 64}\n"
             "  - uses: prune\n    with: {target: ffn, ratio: 0.5, keep: 1}\n"
             "  - uses: distill\n    with: {epochs: 3, batch_size: 16, learning_rate: 1.0e-3, max_length: 64}\n")
    record = run_recipe(_recipe(embedder, sts, steps), tmp_path, cache=tmp_path / "cache")
    assert record["status"] == "ok", record.get("error")
    teacher, pruned, distilled = (Path(a["path"]) for a in record["artifacts"][1:4])
    sentences = sorted({s for line in sts["eval"].read_text().splitlines() for s in line.split("\t")[5:7]})
    target = _encode(teacher, sentences)
    centre = target.mean(0)  # a tiny model's vectors share one direction; compare what differs between sentences

    def closeness(model: Path) -> float:
        from compressor.tasks.sentence_embedding import cosines

        return float(cosines(_encode(model, sentences) - centre, target - centre).mean())

    before, after = closeness(pruned), closeness(distilled)
    assert 1 - after < 0.7 * (1 - before), (before, after)  # the gap to the teacher shrinks by a third or more


def _check(cli_run, tmp_path: Path, text: str) -> tuple[int, str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    code, out, err = cli_run("check", str(recipe))
    return code, out + err


def test_a_model_without_pooling_files_is_refused_unless_the_recipe_gives_one(tmp_path, cli_run, sts, embedder):
    bare = tmp_path / "bare"
    shutil.copytree(embedder, bare)
    for name in ("modules.json", "1_Pooling", "2_Normalize"):
        shutil.rmtree(bare / name) if (bare / name).is_dir() else (bare / name).unlink()
    before = sorted(p.name for p in bare.iterdir())
    steps = "  - uses: export-onnx\n"
    code, out = _check(cli_run, tmp_path, _recipe(bare, sts, steps))
    assert code == 2 and "model.pooling" in out and "no sentence-transformers files" in out
    code, out = _check(cli_run, tmp_path, _recipe(bare, sts, steps, model_extra=", pooling: mean"))
    assert code == 0, out
    assert sorted(p.name for p in bare.iterdir()) == before  # the input is never modified
    code, out = _check(cli_run, tmp_path, _recipe(embedder, sts, steps, model_extra=", pooling: cls"))
    assert code == 2 and "declares mean" in out
    code, out = _check(cli_run, tmp_path, _recipe(embedder, sts, steps, model_extra=", poolng: mean"))
    assert code == 2 and "model.poolng" in out


def test_pooling_the_task_cannot_compute_is_refused(tmp_path, cli_run, sts, embedder):
    model = tmp_path / "m"
    shutil.copytree(embedder, model)
    config = json.loads((model / "1_Pooling" / "config.json").read_text())
    (model / "1_Pooling" / "config.json").write_text(json.dumps({**config, "pooling_mode_max_tokens": True}))
    code, out = _check(cli_run, tmp_path, _recipe(model, sts, "  - uses: export-onnx\n"))
    assert code == 2 and "mean, max" in out
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "name": "3", "path": "3_Dense",
                                                               "type": "sentence_transformers.models.Dense"}]))
    code, out = _check(cli_run, tmp_path, _recipe(model, sts, "  - uses: export-onnx\n"))
    assert code == 2 and "Dense" in out


@pytest.mark.parametrize("edit,words", [
    (lambda f: f[:6], ["line 3", "column 'sentence2' is missing"]),
    (lambda f: f[:4] + ["high"] + f[5:], ["line 3", "data.label", "'high', not a number"]),
    (lambda f: f[:5] + ["  "] + f[6:], ["line 3", "sentence 1", "is empty"]),
])
def test_bad_pairs_get_one_message_naming_file_line_and_column(tmp_path, cli_run, sts, embedder, edit, words):
    lines = sts["eval"].read_text(encoding="utf-8").splitlines()[:20]
    fields = lines[2].split("\t")
    lines[2] = "\t".join(edit(fields))
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out = _check(cli_run, tmp_path, _recipe(embedder, {**sts, "eval": bad}, "  - uses: export-onnx\n"))
    assert code == 2, out
    assert str(bad) in out.replace("\n", "") or bad.name in out
    for w in words:
        assert w in out, (w, out)
    assert "Traceback" not in out


def test_the_bundle_serves_openai_embeddings(int8_run):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    import httpx

    from compressor.bundle.device.runtime import Predictor
    from conftest import bundle_server, served

    bundle = int8_run["run"] / "bundle"
    want = [np.asarray(Predictor(bundle).predict([t])[0]["embedding"]) for t in TEXTS]
    with served(bundle_server(bundle)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        response = client.embeddings.create(model="tiny-sts", input=TEXTS)  # the client asks for base64
        assert [d.index for d in response.data] == [0, 1, 2, 3]
        for d, w in zip(response.data, want):
            np.testing.assert_allclose(d.embedding, w, atol=0.02)  # batched int8: activations quantized per batch
            assert float(np.dot(d.embedding, w) / np.linalg.norm(d.embedding) / np.linalg.norm(w)) > 0.995
        assert response.usage.prompt_tokens > 4 * 3
        one = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}).json()
        np.testing.assert_allclose(one["data"][0]["embedding"], want[0], atol=1e-5)  # alone: the same batch of one
        for body, status in (({"input": []}, 400), ({"input": [1, 2]}, 400), ({"input": "a", "dimensions": 7}, 400),
                             ({"input": "a", "model": "other"}, 404), ({"input": "a", "encoding_format": "x"}, 400)):
            r = httpx.post(f"{url}/v1/embeddings", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["message"]
