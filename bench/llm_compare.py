"""The LLM recipe against its peers, on the same fine-tuned SmolLM2, the same text and 2 threads, one run.

    python bench/llm_compare.py RUN_DIR [--threads 2] [--rounds 7] [--out FILE.md] [--llama-cpp "$(bash bench/peers/llama_cpp_setup.sh)"]

RUN_DIR is the run directory that `compressor run recipes/smollm2-sst2-int4.yaml` writes (under runs/);
the table goes to --out (default RUN_DIR/llm_compare.md) and its figures beside it as JSON.

Rows: PyTorch FP32 (the fine-tuned, merged model), ONNX FP32 (our export), the onnxruntime-genai model
builder's `-p int4 -e cpu` with its defaults (the installed onnxruntime-genai's builder, built here from the
same fine-tuned model), and our int4; with --llama-cpp (the python of the side venv that bench/peers/llama_cpp_setup.sh builds),
llama.cpp's f32 GGUF of the same fine-tuned model (its convert_hf_to_gguf.py) and its own Q4_K_M and Q4_0
quantizations, scored by bench/peers/llama_cpp_row.py on the same token ids. Every compressor model is
measured by the same evaluator the recipe uses: perplexity on WikiText-2 test (the recipe's tokens and
windows), greedy-answer accuracy on SST-2 dev, and, in a fresh process per model, time to first token
for a 128-token prompt, decode tokens/s over 128 new tokens at batch 1 (the same plain onnxruntime loop
for every ONNX model) and that process's peak RSS. Ratios are against ONNX FP32 measured in this run.
Then the three ONNX models' decode speed once more, interleaved in one process for --rounds rounds
(bench/decode_interleaved.py), and ours against the builder's as the median of the rounds' ratios: a fresh
process per model moves by ±15% as the machine's speed drifts, a ratio taken within one round does not.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_with_genai(hf_dir: Path, out: Path) -> float:
    """The builder's default int4 CPU model of `hf_dir` in `out` (with the fine-tuned tokenizer); seconds."""
    if (out / "model.onnx").is_file():
        return 0.0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir),
                    "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache")], check=True,
                   stdout=subprocess.DEVNULL)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    return time.perf_counter() - t0


def llama_cpp_rows(python: Path, hf_dir: Path, work: Path, rows: list, task_settings: dict, threads: int
                   ) -> list[dict]:
    """llama.cpp's f32, Q4_K_M and Q4_0 rows: converted and quantized by llama.cpp's own tools, then fed the
    evaluator's token ids (perplexity windows, answer prompts, timing prompt) in a fresh process each."""
    import math

    from compressor.models.loading import load_tokenizer
    from compressor.tasks.text_generation import (GenerationEvalConfig, TextGeneration, _generation_config,
                                                  _timing_prompt, chat_wrap, first_windows, spread_windows,
                                                  stop_ids)

    tree = python.resolve().parent.parent / "llama.cpp"
    row_script = REPO / "bench" / "peers" / "llama_cpp_row.py"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
                        "--outfile", str(f32)], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": f"{tree / 'gguf-py'}:{tree.parent / 'convert-extras'}"})
    for ftype in ("Q4_K_M", "Q4_0"):
        if not (work / f"{ftype}.gguf").is_file():
            subprocess.run([str(python), str(row_script), "quantize", str(f32), str(work / f"{ftype}.gguf"), ftype,
                            "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = GenerationEvalConfig.model_validate(task_settings)
    tokenizer = load_tokenizer(hf_dir)
    file = Path(config.perplexity_file)
    if config.perplexity_windows:
        windows = spread_windows(tokenizer, file, config.perplexity_windows, config.window)[0]
    else:
        windows = first_windows(tokenizer, file, config.perplexity_tokens, config.window)
    answered = [r for r in rows if r.label is not None][: config.accuracy_rows]
    longest = max(len(tokenizer(str(r.label), add_special_tokens=False)["input_ids"]) for r in answered)
    prompt = _timing_prompt(tokenizer, config)
    job = {"windows": windows, "prompts": [chat_wrap(tokenizer, r.text, r.chat) for r in answered],
           "max_new": config.max_new_tokens or longest + 1,
           "stop": sorted(stop_ids(tokenizer, _generation_config(hf_dir))), "timing_prompt": prompt,
           "new_tokens": config.new_tokens, "runs": config.timing_runs}
    (work / "job.json").write_text(json.dumps(job))
    out = []
    for label, name in (("llama.cpp f32 GGUF (convert_hf_to_gguf.py)", "f32"), ("llama.cpp Q4_K_M", "Q4_K_M"),
                        ("llama.cpp Q4_0", "Q4_0")):
        print(f"measuring {label} …", flush=True)
        proc = subprocess.run([str(python), str(row_script), "measure", str(work / f"{name}.gguf"),
                               str(work / "job.json"), "--threads", str(threads)], check=True, capture_output=True,
                              text=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        answers = [tokenizer.decode(a, skip_special_tokens=True) for a in m["answers"]]
        out.append({"row": label, "path": str(work / f"{name}.gguf"),
                    "size_bytes": (work / f"{name}.gguf").stat().st_size,
                    "perplexity": math.exp(sum(m["window_nll"]) / sum(len(w) - 1 for w in windows)),
                    "accuracy": TextGeneration().score(answered, answers, [])["accuracy"],
                    "latency": {"ttft_ms": m["ttft_ms"], "decode_tokens_per_s": m["decode_tokens_per_s"],
                                "peak_rss_mb": m["peak_rss_mb"], "prompt_tokens": len(prompt),
                                "new_tokens": config.new_tokens}})
    return out


def interleaved_lines(paths: list[Path], rounds: int, latency: dict, threads: int, results: list[dict]
                      ) -> list[str]:
    """The ONNX FP32, builder and our models' decode, interleaved round by round, as Markdown (and, per model,
    `interleaved_tokens_per_s` in `results`)."""
    sys.path.insert(0, str(REPO / "bench"))
    from decode_interleaved import interleaved_speeds, median_ratio

    speeds, _ = interleaved_speeds(paths, rounds, latency["prompt_tokens"], latency["new_tokens"], threads)
    fp32, builder, ours = (speeds[p] for p in paths)
    for r in results:
        if Path(r["path"]) / "model.onnx" in speeds:
            r["interleaved_tokens_per_s"] = speeds[Path(r["path"]) / "model.onnx"]
    out = ["", f"Decode interleaved in one process, {rounds} rounds after a warm-up (tok/s of each round):", "",
           "| model | best | median | × builder (median of rounds) | rounds |", "|---|---:|---:|---:|---|"]
    for name, values in (("ONNX FP32", fp32), ("builder int4", builder), ("ours: int4 recipe", ours)):
        out.append(f"| {name} | {max(values):.1f} | {statistics.median(values):.1f} | "
                   f"{median_ratio(values, builder):.2f}× | {', '.join(f'{v:.0f}' for v in values)} |")
    return out


def main() -> int:
    """Measure every row and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory of recipes/smollm2-sst2-int4.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved decode rounds (0: none)")
    parser.add_argument("--accuracy-rows", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/llm_compare.md")
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="python of the llama.cpp side venv (bench/peers/llama_cpp_setup.sh): adds its rows")
    args = parser.parse_args()
    args.out = args.out or args.run / "llm_compare.md"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from compressor.models.artifact import Artifact
    from compressor.models.data import DataSource
    from compressor.evaluate.base import EvalSettings
    from compressor.evaluate.measure import model_bytes
    from compressor.run.record import environment
    from compressor.tasks.generation_report import perplexity_sample
    from compressor.tasks.text_generation import GenerationEvaluator

    record = json.loads((args.run / "record.json").read_text())
    steps = {s["uses"]: Path(s["path"]) for s in record["steps"]}
    finetuned, exported = Artifact.load(steps["finetune"]), Artifact.load(steps["export-onnx"])
    ours = Artifact.load(Path(record["steps"][-1]["path"]))
    work = args.run / "peers"
    work.mkdir(exist_ok=True)
    build_seconds = build_with_genai(finetuned.path, work / "genai-int4")
    builder = Artifact(path=work / "genai-int4", format="onnx", task="text-generation")

    recipe = record["recipe"]
    data = recipe["data"]
    rdir = Path(record["recipe_path"]).parent
    rows = DataSource(data["format"], {"eval": (rdir / data["eval"]).resolve()}, data["text"], data["label"],
                      prompt=data.get("prompt"), completions=data.get("completions"),
                      chat_template=data.get("chat_template")).load("eval")
    task_settings = dict(recipe["evaluate"]["task"])
    task_settings["perplexity_file"] = str((rdir / task_settings["perplexity_file"]).resolve())
    if args.accuracy_rows:
        task_settings["accuracy_rows"] = args.accuracy_rows
    settings = EvalSettings(threads=args.threads, task=task_settings)
    evaluator = GenerationEvaluator()
    results = []
    partial = args.out.with_suffix(".partial.json")  # rows measured by an interrupted run of the same settings
    done = {r["path"]: r for r in json.loads(partial.read_text())} if partial.is_file() else {}
    for label, artifact in (("PyTorch FP32 (fine-tuned, merged)", finetuned), ("ONNX FP32 (our export, builder graph)", exported),
                            ("onnxruntime-genai builder int4 (defaults)", builder), ("ours: int4 recipe", ours)):
        if str(artifact.path) in done and done[str(artifact.path)].get("settings") == task_settings:
            results.append(done[str(artifact.path)])
            continue
        print(f"measuring {label} …", flush=True)
        m = evaluator.evaluate(artifact, rows, settings)
        results.append({"row": label, "path": str(artifact.path), "size_bytes": model_bytes(artifact),
                        "settings": task_settings, **m})
        partial.write_text(json.dumps(results, default=str))
    if args.llama_cpp:
        results += llama_cpp_rows(args.llama_cpp, finetuned.path, work / "llama-cpp", rows, task_settings,
                                  args.threads)
    fp32 = results[1]
    lines = ["# SmolLM2-135M-Instruct fine-tuned on SST-2: our int4 recipe and its peers", "",
             f"Measured on {environment()['cpu']}, {args.threads} threads, one run "
             f"({time.strftime('%Y-%m-%d')}); `python bench/llm_compare.py {args.run}`. Perplexity: "
             f"{Path(task_settings['perplexity_file']).name}, {perplexity_sample(fp32)}. Accuracy: greedy answers to {fp32['accuracy_rows']} "
             f"SST-2 dev rows, exact match. Speed: batch 1, a {fp32['latency']['prompt_tokens']}-token prompt, "
             f"{fp32['latency']['new_tokens']} new tokens, every ONNX model in the same numpy + onnxruntime loop "
             "(compressor/bundle/device/generation_runtime.py), each in a fresh process. The fine-tuned weights started as "
             "the Q4_1 GGUF (4-bit blocks of 32) dequantized to float32 before fine-tuning.", "",
             "| model | perplexity | Δ vs FP32 | accuracy | MB | ×smaller | TTFT ms | decode tok/s | ×FP32 decode "
             "| peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lat = r["latency"]
        lines.append(f"| {r['row']} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / fp32['perplexity'] - 1):+.1f}% "
                     f"| {r['accuracy']:.4f} | {r['size_bytes'] / 1e6:.1f} | "
                     f"{fp32['size_bytes'] / r['size_bytes']:.2f}× | {lat['ttft_ms']:.0f} | "
                     f"{lat['decode_tokens_per_s']:.1f} | "
                     f"{lat['decode_tokens_per_s'] / fp32['latency']['decode_tokens_per_s']:.2f}× | "
                     f"{lat['peak_rss_mb']:.0f} |")
    if args.rounds:
        lines += interleaved_lines([a.path / "model.onnx" for a in (exported, builder, ours)], args.rounds,
                                   fp32["latency"], args.threads, results)
    if build_seconds:
        lines += ["", f"The builder took {build_seconds:.0f} s."]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
