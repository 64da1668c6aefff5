"""`compressor serve` and a bundle's serve.py as real processes on 127.0.0.1, driven by the official `openai`
client and by httpx: a tiny classifier bundle and a tiny generation bundle, their answers against what the
bundle gives in process, the error statuses, the API key, a disconnect mid-stream, SIGTERM with requests in
flight, and a tampered bundle."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import bundle_server, free_port, recipe_text, served

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


def metric(url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples called `name` (any labels)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")


@pytest.fixture(scope="module")
def classifier_bundle(tmp_path_factory, tiny_text_model, sst2_small) -> Path:
    from compressor.testing import run_recipe

    tmp = tmp_path_factory.mktemp("serve-cls")
    recipe = recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                         "  - uses: export-onnx\n",
                         "bundle: {formats: [onnx], tar: true}\n").replace("name: test", "name: tiny-cls")
    record = run_recipe(recipe, tmp, cache=tmp / "cache")
    assert record["status"] == "ok"
    return tmp / "run" / "bundle"


def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """The same labels, scores equal to float rounding (a batch pads each text to its batch's longest; a float
    model's masked attention makes that a rounding difference. A dynamic-int8 model quantizes activations per
    batch, so there batch mates move scores by more: these bundles are float)."""
    return len(got) == len(want) and all(g["label"] == w["label"] and abs(g["score"] - w["score"]) < 1e-4
                                         for g, w in zip(got, want))


def test_a_classifier_bundle_serves_what_it_predicts(classifier_bundle, sst2_small):
    from compressor.bundle.device.runtime import Predictor

    texts = [line.split("\t")[0] for line in sst2_small["eval"].read_text().splitlines()[1:41]]
    expected = Predictor(classifier_bundle).predict(texts)
    with served([sys.executable, "-m", "compressor", "serve", str(classifier_bundle.with_name("bundle.tar.gz")),
                 "--max-wait-ms", "20"]) as (url, _):
        assert same([httpx.post(f"{url}/predict", json={"inputs": texts[0]}).json()], expected[:1])
        assert same(httpx.post(f"{url}/predict", json={"inputs": texts[:5]}).json(), expected[:5])
        # 40 clients at once: micro-batched together, each gets its own answer
        results: dict[int, Any] = {}

        def ask(i: int) -> None:
            results[i] = httpx.post(f"{url}/predict", json={"inputs": texts[i]}, timeout=30).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert same([results[i] for i in range(len(texts))], expected)
        assert metric(url, "compressor_batch_size_sum") / metric(url, "compressor_batch_size_count") > 1.2
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        assert name == "tiny-cls"
        meta = httpx.get(f"{url}/v2/models/{name}").json()
        assert meta["inputs"][0]["datatype"] == "BYTES"
        out = httpx.post(f"{url}/v2/models/{name}/infer",
                         json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts[:3]}]})
        assert same([json.loads(d) for d in out.json()["outputs"][0]["data"]], expected[:3])
        assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
        assert 'compressor_requests_total{route="/predict",status="200"}' in httpx.get(f"{url}/metrics").text


@pytest.mark.parametrize("request_,status,words", [
    (dict(content=b"{not json"), 400, ["not valid JSON"]),
    (dict(json={"inputs": 3}), 400, ["inputs"]),
    (dict(json={"inputs": []}), 400, ["non-empty"]),
    (dict(content=b'{"inputs": "' + b"a" * 5000 + b'"}', headers={"content-type": "application/json"}), 413,
     ["4096", "--max-body-bytes"]),
])
def test_a_classifier_server_answers_bad_requests_in_the_openai_shape(classifier_bundle, request_, status, words,
                                                                       _classifier_url):
    response = httpx.post(f"{_classifier_url}/predict", **request_)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and all(w in error["message"] for w in words)
    assert httpx.get(f"{_classifier_url}/health").status_code == 200  # still up


def test_kserve_errors_name_what_is_wrong(_classifier_url):
    bad = httpx.post(f"{_classifier_url}/v2/models/tiny-cls/infer",
                     json={"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [1]}]})
    assert bad.status_code == 400 and "BYTES" in bad.json()["error"]["message"]
    missing = httpx.post(f"{_classifier_url}/v2/models/other/infer", json={"inputs": []})
    assert missing.status_code == 404 and "'other'" in missing.json()["error"]["message"]


@pytest.fixture(scope="module")
def _classifier_url(classifier_bundle) -> Iterator[str]:
    with served(bundle_server(classifier_bundle, "--max-body-bytes", "4096")) as (url, _):
        yield url


def test_the_api_key_guards_every_route_but_health(classifier_bundle, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_API_KEY", "s3cret")
    with served(bundle_server(classifier_bundle)) as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.post(f"{url}/predict", json={"inputs": "a film"}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
        ok = httpx.post(f"{url}/predict", json={"inputs": "a film"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and "label" in ok.json()


def test_a_tampered_bundle_is_refused_before_binding(classifier_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(classifier_bundle, copy)
    with open(copy / "tokenizer.json", "a") as fh:
        fh.write(" ")
    for command in (bundle_server(copy), [sys.executable, "-m", "compressor", "serve", str(copy)]):
        result = subprocess.run([*command, "--port", str(free_port())], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "tokenizer.json" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_bundle_serves_on_a_device_without_torch_or_compressor(classifier_bundle, device_python, tmp_path):
    from compressor.bundle.device.runtime import Predictor

    device = tmp_path / "device"
    shutil.copytree(classifier_bundle, device)
    expected = Predictor(classifier_bundle).predict(["a gripping film", "a dull plot"])
    with served([str(device_python), str(device / "serve.py")]) as (url, _):
        assert same(httpx.post(f"{url}/predict", json={"inputs": ["a gripping film", "a dull plot"]}).json(), expected)


# generation --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generation_bundle(tmp_path_factory, sst2_small) -> Path:
    """A tiny Llama (random weights large enough to vary, a 2048-token context), exported and bundled."""
    from compressor.testing import build_tiny_llama, run_recipe, tiny_llama_texts

    tmp = tmp_path_factory.mktemp("serve-gen")
    model = build_tiny_llama(tmp / "model", tiny_llama_texts(), initializer_range=0.3, max_position_embeddings=2048)
    recipe = (f"version: 1\nname: tiny-gen\nmodel: {{path: {model}, task: text-generation}}\n"
              f"data: {{format: tsv, train: {sst2_small['train']}, eval: {sst2_small['eval']}, text: sentence, "
              "label: label}\nsteps:\n  - uses: export-onnx\n    with: {atol: 1.0e-3, parity_rows: 4}\n"
              "evaluate:\n  task: {perplexity_tokens: 256, window: 64, accuracy_rows: 4, prompt_tokens: 16, "
              "new_tokens: 8, timing_runs: 1}\nbundle: {formats: [onnx]}\n")
    record = run_recipe(recipe, tmp, cache=tmp / "cache")
    assert record["status"] == "ok"
    return tmp / "run" / "bundle"


@pytest.fixture(scope="module")
def generation_url(generation_bundle) -> Iterator[str]:
    with served(bundle_server(generation_bundle, "--max-num-seqs", "4")) as (url, _):
        yield url


def _client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


PROMPTS = ["hello there", "a gripping film about the sea", "the plot is thin", "what a waste of time",
           "one of the best films of the year"]


@pytest.mark.slow
def test_chat_and_completions_give_the_greedy_tokens_of_the_bundle(generation_bundle, generation_url, cli_run):
    from compressor.bundle.device.runtime import Predictor

    answers = Predictor(generation_bundle).answers
    client = _client(generation_url)
    for prompt in PROMPTS[:3]:
        expected = answers.predict([prompt])[0]["text"]
        code, out, _ = cli_run("predict", str(generation_bundle), prompt)
        assert code == 0 and out.rstrip("\n") == expected
        chat = client.chat.completions.create(model="tiny-gen", messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=40)
        want = answers.tokens(prompt, 40)
        assert chat.choices[0].message.content == "".join(answers.stream(prompt, 40))  # what predict.py streams
        assert chat.usage.completion_tokens == len(want)
        assert chat.choices[0].finish_reason == ("length" if len(want) == 40 else "stop")
        streamed = client.chat.completions.create(model="tiny-gen", messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=40, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in streamed]
        assert "".join(pieces) == chat.choices[0].message.content
        ids = answers.tokenizer.encode(prompt).ids
        raw = list(answers.lm.stream(ids, 12, set(answers.generation["stop_ids"])))
        completion = client.completions.create(model="tiny-gen", prompt=prompt, temperature=0, max_tokens=12)
        assert completion.choices[0].text == answers.tokenizer.decode(raw, skip_special_tokens=True).rstrip("\ufffd")
        assert completion.usage.prompt_tokens == len(ids)
    seeded = [client.completions.create(model="tiny-gen", prompt=PROMPTS[0], temperature=1.0, top_p=0.9, seed=7,
                                        max_tokens=20, extra_body={"ignore_eos": True}).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed repeats a sampled answer
    stop = client.completions.create(model="tiny-gen", prompt=PROMPTS[1], temperature=0, max_tokens=40,
                                     extra_body={"ignore_eos": True})
    cut = stop.choices[0].text[5:8]
    stopped = client.completions.create(model="tiny-gen", prompt=PROMPTS[1], temperature=0, max_tokens=40,
                                        stop=[cut], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == stop.choices[0].text[: stop.choices[0].text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_concurrent_generations_share_decode_steps_and_keep_their_tokens(generation_url):
    def ask(client: Any, prompt: str) -> str:
        stream = client.chat.completions.create(
            model="tiny-gen", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=300,
            stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [ask(_client(generation_url), p) for p in PROMPTS]  # one at a time: each decodes alone
    before = (metric(generation_url, "compressor_batch_size_sum"), metric(generation_url, "compressor_batch_size_count"))
    clients = [_client(generation_url) for _ in PROMPTS]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(clients[i], PROMPTS[i])))
               for i in range(len(PROMPTS))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [results[i] for i in range(len(PROMPTS))] == alone  # batched, each keeps its own greedy tokens
    rows = metric(generation_url, "compressor_batch_size_sum") - before[0]
    steps = metric(generation_url, "compressor_batch_size_count") - before[1]
    assert rows / steps > 1.5  # most decode steps ran several sequences in one forward pass


@pytest.mark.slow
@pytest.mark.parametrize("body,status,words", [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, ["2048 tokens", "max_tokens"]),
    ({"messages": [{"role": "user", "content": "word " * 2100}]}, 400, ["maximum context length is 2048"]),
    ({"messages": []}, 400, ["messages"]),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, ["temperature"]),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, ["role"]),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, ["'gpt-9'", "tiny-gen"]),
])
def test_generation_errors_have_their_status_and_message(generation_url, body, status, words):
    response = httpx.post(f"{generation_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert all(w in response.json()["error"]["message"] for w in words), response.text
    assert httpx.get(f"{generation_url}/health").status_code == 200


@pytest.mark.slow
def test_a_full_queue_answers_429_and_the_server_recovers(generation_bundle):
    with served(bundle_server(generation_bundle, "--max-num-seqs", "1", "--max-queue", "1")) as (url, _):
        statuses: list[int] = []

        def ask(max_tokens: int) -> None:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": max_tokens,
                                                          "ignore_eos": True, "temperature": 0}, timeout=60)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"

        # The first request holds the one slot before the others arrive, so exactly one of them can wait.
        first = threading.Thread(target=ask, args=(1500,))
        first.start()
        deadline = time.time() + 30
        while metric(url, "compressor_active_sequences") < 1 and time.time() < deadline:
            time.sleep(0.02)
        threads = [threading.Thread(target=ask, args=(20,)) for _ in range(5)]
        [t.start() for t in threads]
        [t.join() for t in [first, *threads]]
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
        again = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert again.status_code == 200


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_slot(generation_url):
    before = metric(generation_url, "compressor_generated_tokens_total")
    with httpx.stream("POST", f"{generation_url}/v1/completions", timeout=30,
                      json={"prompt": "hello", "max_tokens": 1900, "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.time() + 10
    while metric(generation_url, "compressor_active_sequences") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(generation_url, "compressor_active_sequences") == 0
    time.sleep(0.3)
    assert metric(generation_url, "compressor_generated_tokens_total") - before < 1900  # it stopped early


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_and_exits_0(generation_bundle):
    with served(bundle_server(generation_bundle, "--grace", "60")) as (url, proc):
        bodies: dict[int, str] = {}

        def ask(i: int) -> None:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                              json={"prompt": PROMPTS[i], "max_tokens": 1500, "ignore_eos": True,
                                    "stream": True, "temperature": 0}) as r:
                bodies[i] = "\n".join(r.iter_lines())

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        deadline = time.time() + 30
        while metric(url, "compressor_active_sequences") < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert metric(url, "compressor_active_sequences") == 2
        proc.send_signal(signal.SIGTERM)
        [t.join() for t in threads]
        assert proc.wait(timeout=60) == 0
    for body in bodies.values():
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        assert body.rstrip().endswith("data: [DONE]") and events[-1]["choices"][0]["finish_reason"] == "length"
        assert len([e for e in events if e["choices"][0]["text"]]) > 100


@pytest.mark.slow
def test_kserve_infer_answers_a_generator_as_predict_does(generation_bundle, generation_url):
    from compressor.bundle.device.runtime import Predictor

    expected = Predictor(generation_bundle).predict(PROMPTS[:2])
    out = httpx.post(f"{generation_url}/v2/models/tiny-gen/infer", timeout=60,
                     json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": PROMPTS[:2]}]})
    assert [json.loads(d) for d in out.json()["outputs"][0]["data"]] == expected


def test_cors_is_off_unless_an_origin_is_named(classifier_bundle, _classifier_url):
    origin = {"Origin": "http://app.example"}
    assert "access-control-allow-origin" not in httpx.get(f"{_classifier_url}/v1/models", headers=origin).headers
    with served(bundle_server(classifier_bundle, "--cors-origin", "http://app.example")) as (url, _):
        allowed = httpx.get(f"{url}/v1/models", headers=origin).headers
        assert allowed["access-control-allow-origin"] == "http://app.example"
        other = httpx.get(f"{url}/v1/models", headers={"Origin": "http://evil.example"}).headers
        assert "access-control-allow-origin" not in other


def test_a_schema_2_bundle_still_verifies_and_predicts_on_the_host(classifier_bundle, tmp_path, cli_run):
    """A bundle written before the answers modules (manifest schema 2: `output` names the answer's shape)."""
    old = tmp_path / "old"
    shutil.copytree(classifier_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for name in ("labels.py", "serve.py"):
        (old / name).unlink()
        manifest["files"].pop(name)
    manifest.update(schema_version=2, output="label")
    manifest.pop("output_module")
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli_run("verify", str(old))
    assert code == 0 and "golden outputs within tolerance" in out, err
    code, out, err = cli_run("predict", str(old), "a gripping film")
    assert code == 0 and json.loads(out)["prediction"]["label"] in manifest["labels"], err
