"""llama.cpp as a peer of bench/llm_compare.py; runs in the side venv of bench/peers/llama_cpp_setup.sh.

    VENV/bin/python bench/peers/llama_cpp_row.py quantize F32.gguf OUT.gguf Q4_K_M [--threads 2]
    VENV/bin/python bench/peers/llama_cpp_row.py measure MODEL.gguf JOB.json [--threads 2]

`quantize` runs llama.cpp's own quantizer (llama_model_quantize, what the llama-quantize tool calls).
`measure` reads JOB.json, written by llm_compare.py with compressor's tokenizer: `windows` (token ids of the
perplexity windows, each scored from an empty context, as compressor's evaluator scores them), `prompts`,
`max_new` and `stop` (greedy answers), `timing_prompt`, `new_tokens` and `runs` (decode speed, one untimed
warm-up run, best of the rest, as compressor/evaluate/generation_timing.py times). It prints one JSON line:
each window's summed NLL, the answers' token ids, time to first token, decode tokens/s and this process's
peak RSS. Token ids go in and come out, so both sides read the same text through the same tokenizer.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import numpy as np

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def quantize(src: Path, out: Path, ftype: str, threads: int) -> None:
    """llama.cpp's quantizer with its defaults for `ftype`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[ftype], threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {ftype}")


def nll(logits: np.ndarray, targets: list[int]) -> float:
    """Summed -log p(target) under softmax(logits), in float64 (compressor's nll_from_logits)."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


def measure(model: Path, job: dict, threads: int) -> dict:
    """Perplexity windows, greedy answers and decode speed of one GGUF file."""
    from llama_cpp import Llama

    width = max([len(w) for w in job["windows"]] + [len(job["timing_prompt"]) + job["new_tokens"], 256])
    scorer = Llama(str(model), n_ctx=width, n_batch=width, n_ubatch=width, n_threads=threads,
                   n_threads_batch=threads, logits_all=True, verbose=False)
    windows = []
    for ids in job["windows"]:
        scorer.reset()
        scorer.eval(ids)
        windows.append(nll(np.asarray(scorer.scores[: len(ids) - 1]), ids[1:]))
    del scorer
    llm = Llama(str(model), n_ctx=width, n_batch=width, n_ubatch=width, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def last_argmax() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())

    answers, stop = [], set(job["stop"])
    for prompt in job["prompts"]:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(job["max_new"]):
            token = last_argmax()
            if token in stop:
                break
            out.append(token)
            llm.eval([token])
        answers.append(out)
    ttfts, decodes = [], []
    for run in range(job["runs"] + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(job["timing_prompt"])
        token = last_argmax()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(job["new_tokens"]):
            llm.eval([token])
            token = last_argmax()
        if run:  # the first run warms up
            ttfts.append(ttft)
            decodes.append(time.perf_counter() - t1)
    rss = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {"window_nll": windows, "answers": answers, "ttft_ms": 1000 * min(ttfts),
            "decode_tokens_per_s": job["new_tokens"] / min(decodes), "peak_rss_mb": rss}


def main() -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("ftype", choices=sorted(FTYPES))
    q.add_argument("--threads", type=int, default=2)
    m = sub.add_parser("measure")
    m.add_argument("model", type=Path)
    m.add_argument("job", type=Path)
    m.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "quantize":
        quantize(args.src, args.out, args.ftype, args.threads)
    else:
        print(json.dumps(measure(args.model, json.loads(args.job.read_text()), args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
