"""Load on `compressor serve`, against the same bundle called in process, on one machine in one run.

    python bench/serve_load.py BUNDLE [--concurrency 1 8 32] [--requests 400] [--seconds 60]

A classifier bundle (the main job's MiniLM int8): the in-process baseline is the bundle's own runtime at batch 1
(p50 latency of one text) and batch 32 (texts/s); the server gets /predict with one SST-2 dev sentence per request
from C concurrent connections, and reports requests/s, p50 and p99 latency and errors per concurrency. The
clients are wrk (`apt install wrk`) where it is installed: on a 2-core machine a Python client would take the
cores the server needs (httpx reached 367 requests/s on a route that does nothing at 32 connections, while
wrk drove 960 requests/s through /predict itself). Without wrk they are httpx, and the figures measure the client as much as the
server.
A generation bundle (the LLM job's SmolLM2 int4): the baseline is the bundle's KV-cache loop in process (time to
first token, decode tokens/s); the server gets streamed chat requests (the openai wire format, 128 new tokens,
`ignore_eos`) from C clients (httpx: a streamed token costs the client far less than the model's decode step) and reports time to first token, aggregate decode tokens/s and errors.
With `--peer URL --peer-model NAME` the same generation clients also load another OpenAI-compatible server
already running at URL (llama.cpp's, `python -m llama_cpp.server --model SmolLM2.gguf --n_threads 2`, in a side
venv), after ours, at the same concurrency levels. Each concurrency level is bounded by --requests and --seconds. The server runs in its own process with the
default options; the baseline runs while the server is idle. Writes runs/serve_load/RESULT.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

NEW_TOKENS = 128


def sentences(limit: int = 400) -> list[str]:
    """Real SST-2 dev sentences."""
    from compressor.testing import require_data

    rows = (require_data("sst2/dev.tsv") / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [r.split("\t")[0] for r in rows][:limit]


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`, or None."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def wait_healthy(url: str, seconds: float = 300) -> None:
    """Until `url`/health answers 200 (RuntimeError after `seconds`)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy in {seconds:.0f} s")


def write_result(result: dict[str, Any], out: Path) -> None:
    """The figures as JSON in `out` (its directory made) and on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


@contextlib.contextmanager
def server(bundle: Path, options: list[str]) -> Any:
    """`compressor serve BUNDLE` on a free port of 127.0.0.1, healthy; stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "compressor", "serve", str(bundle), "--port", str(port), *options],
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def classifier_baseline(bundle: Path, texts: list[str]) -> dict[str, Any]:
    """The bundle's runtime in process: batch-1 p50 of one text, batch-32 texts/s."""
    from compressor.bundle.device.runtime import Predictor

    predictor = Predictor(bundle)
    predictor.predict(texts[:32])
    singles = []
    for text in texts[:200]:
        t0 = time.perf_counter()
        predictor.predict([text])
        singles.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    for i in range(0, 320, 32):
        predictor.predict(texts[i : i + 32])
    return {"p50_ms_b1": statistics.median(singles), "texts_per_s_b32": 320 / (time.perf_counter() - t0)}


async def classifier_load(url: str, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    """C clients each sending one text per /predict request, one after another."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.perf_counter() < deadline:
            text = texts[sent % len(texts)]
            sent += 1
            t0 = time.perf_counter()
            r = await c.post(f"{url}/predict", json={"inputs": text})
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        await client(c)  # warm-up request
        latencies.clear()
        sent = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / wall, "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99)}


def wrk_load(url: str, texts: list[str], concurrency: int, seconds: float, work: Path) -> dict[str, Any]:
    """wrk with C connections for `seconds`, one text per request, cycling through `texts`."""
    import re
    import shutil

    script = work / "predict.lua"
    bodies = ",\n".join(f"[==[{json.dumps({'inputs': t})}]==]" for t in texts)
    script.write_text(f"bodies = {{{bodies}}}\ni = 0\nrequest = function()\n  i = i % #bodies + 1\n"
                      '  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, bodies[i])\n'
                      "end\n")
    out = subprocess.run([shutil.which("wrk"), "-t1", f"-c{concurrency}", f"-d{max(1, int(seconds))}s", "--latency",
                          "-s", str(script), f"{url}/predict"], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float | None:
        found = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, flags=re.M)
        return float(found.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[found.group(2)] if found else None

    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"concurrency": concurrency, "client": "wrk", "requests": total,
            "errors": (int(bad.group(1)) if bad else 0) + (sum(map(int, sockets.groups())) if sockets else 0),
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms("50%"), "p99_ms": ms("99%")}


def generation_baseline(bundle: Path, prompts: list[str]) -> dict[str, Any]:
    """The bundle's KV-cache loop in process: time to first token and decode tokens/s for NEW_TOKENS tokens."""
    from compressor.bundle.device.runtime import Predictor

    answers = Predictor(bundle).answers
    ttfts, speeds = [], []
    for prompt in prompts[:4]:
        ids = answers.prompt_ids(prompt)
        t0 = time.perf_counter()
        tokens = 0
        for _ in answers.lm.stream(ids, NEW_TOKENS, set()):
            if tokens == 0:
                first = time.perf_counter()
                ttfts.append((first - t0) * 1000)
            tokens += 1
        speeds.append((tokens - 1) / (time.perf_counter() - first))
    return {"ttft_ms": statistics.median(ttfts[1:]), "decode_tokens_per_s": statistics.median(speeds[1:])}


async def generation_load(url: str, prompts: list[str], concurrency: int, requests: int, seconds: float,
                          model: str | None = None, stop_ids: tuple[int, ...] = ()) -> dict:
    """C clients each streaming one chat answer of up to NEW_TOKENS tokens after another; tokens are counted
    as the streamed chunks that carry text (one per token in this server and in llama.cpp's)."""
    ttfts: list[float] = []
    tokens = 0
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens, errors, sent
        while sent < requests and time.perf_counter() < deadline:
            prompt = prompts[sent % len(prompts)]
            sent += 1
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW_TOKENS,
                    "temperature": 0, "stream": True, "ignore_eos": True,  # ours; a peer may not know it:
                    "logit_bias": {str(t): -100 for t in stop_ids}}      # OpenAI's way to keep the turn open
            t0 = time.perf_counter()
            first = None
            async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    errors += 1
                    continue
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        delta = (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {})
                        if delta.get("content"):
                            first = first or time.perf_counter()
                            tokens += 1
            if first:
                ttfts.append((first - t0) * 1000)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": sent, "errors": errors, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99)}


def main(argv: list[str]) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--requests", type=int, default=400, help="Most requests per concurrency level.")
    parser.add_argument("--seconds", type=float, default=20, help="Most seconds per concurrency level.")
    parser.add_argument("--out", type=Path, default=Path("runs/serve_load"))
    parser.add_argument("--peer", metavar="URL", help="Also load another OpenAI-compatible server already running "
                                                      "at URL (say llama.cpp's) with the same generation clients.")
    parser.add_argument("--peer-model", default=None, help="The model name the peer expects.")
    args = parser.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    generator = "generation" in manifest
    texts = sentences()
    prompts = [f"Is this review positive or negative? {t}" for t in texts]
    from compressor.run.record import cpu_name

    result: dict[str, Any] = {"bundle": manifest.get("name"), "cpu": cpu_name(), "task": manifest["task"]}
    if generator:
        result["in_process"] = generation_baseline(args.bundle, prompts)
        levels = args.concurrency or [1, 4, 8]
        load = generation_load
    else:
        result["in_process"] = classifier_baseline(args.bundle, texts)
        levels = args.concurrency or [1, 8, 32]
        load = classifier_load
    import shutil

    with server(args.bundle, []) as url:
        if not generator and shutil.which("wrk"):
            args.out.mkdir(parents=True, exist_ok=True)
            result["server"] = [wrk_load(url, texts, c, args.seconds, args.out) for c in levels]
        else:
            result["server"] = [asyncio.run(load(url, prompts if generator else texts, c, args.requests,
                                                 args.seconds)) for c in levels]
    if generator and args.peer:
        stops = tuple(manifest["generation"]["stop_ids"])
        result["peer"] = [asyncio.run(generation_load(args.peer, prompts, c, args.requests, args.seconds,
                                                      args.peer_model, stops)) for c in levels]
        for ours, theirs in zip(result["server"], result["peer"]):
            theirs["x_ours"] = theirs["tokens_per_s"] / ours["tokens_per_s"]
    for row in result["server"]:  # the ratios the targets speak of
        base = result["in_process"]
        if generator:
            row["x_tokens_per_s_of_c1"] = row["tokens_per_s"] / result["server"][0]["tokens_per_s"]
            row["ttft_minus_in_process_ms"] = (row["ttft_p50_ms"] or 0) - base["ttft_ms"]
        else:
            row["x_in_process_b32"] = row["requests_per_s"] / base["texts_per_s_b32"]
            row["p50_minus_in_process_b1_ms"] = (row["p50_ms"] or 0) - base["p50_ms_b1"]
    write_result(result, args.out / f"{manifest.get('name', 'bundle')}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
