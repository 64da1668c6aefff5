"""int4 settings for an LLM, chosen on WikiText-2 *valid* (never on test, which the recipe reports).

    python bench/int4_candidates.py RUN_DIR [--tokens 4096] [--window 512]

(RUN_DIR: the run directory of recipes/smollm2-sst2-int4.yaml, under runs/.)

Quantizes the run's ONNX FP32 export with each candidate (quantize-onnx mode: int4 settings: algorithm,
symmetric, block size, accuracy level) and measures perplexity on wikitext-2/valid.txt with the same
evaluator code the recipe uses, plus the size. Asserts nothing; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: llama.cpp's "mixed" layers (first and last eighth of the 30, and every third): what the builder's
#: k_quant_mixed keeps at 8 bits
MIXED = "layers\\.(0|1|2|3|5|8|11|14|17|20|23|26|27|28|29)/(attn/qkv_proj|mlp/down_proj)/"
CANDIDATES = [
    {"algorithm": "minmax", "symmetric": True, "block_size": 32, "accuracy_level": 4},
    {"algorithm": "minmax", "symmetric": True, "block_size": 32, "accuracy_level": 4, "int8_nodes": ["lm_head"]},
    {"algorithm": "minmax", "symmetric": True, "block_size": 32, "accuracy_level": 4,
     "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"]},
    {"algorithm": "minmax", "symmetric": True, "block_size": 32, "accuracy_level": 4, "int8_nodes": [MIXED, "lm_head"]},
    {"algorithm": "minmax", "symmetric": True, "block_size": 32, "accuracy_level": 4, "int8_nodes": ["MatMul"]},
    {"algorithm": "minmax", "symmetric": False, "block_size": 32, "accuracy_level": 4},
    {"algorithm": "minmax", "symmetric": False, "block_size": 32, "accuracy_level": 1},
    {"algorithm": "hqq", "symmetric": False, "block_size": 32, "accuracy_level": 4},
    {"algorithm": "k_quant", "symmetric": False, "block_size": 32, "accuracy_level": 4},
    {"algorithm": "hqq", "symmetric": False, "block_size": 64, "accuracy_level": 4},
    {"algorithm": "hqq", "symmetric": False, "block_size": 128, "accuracy_level": 4},
    # 11-: GPTQ on the recipe's train rows (SST-2 prompts and answers)
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4},
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4,
     "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"]},
    # 13-: GPTQ on 8 seeded 512-token windows of WikiText-2 valid (the script reports any overlap with the
    # tokens it measures)
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8},
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"]},
    # 15-: blocks of 16 (one float scale per 16 weights: 6 bits a weight instead of 5)
    {"algorithm": "minmax", "symmetric": True, "block_size": 16, "accuracy_level": 4},
    {"algorithm": "gptq", "symmetric": True, "block_size": 16, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8},
    # 17: the recipe: GPTQ on 8 valid windows and 64 train rows, MLP down and QKV at 8 bits
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"]},
    # 18: the same, each block's range searched (clip_search)
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"],
     "clip_search": True},
    # 19: 18 on 16 valid windows
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 16, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"],
     "clip_search": True},
    # 20: 18 with 128 train rows
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 128, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"],
     "clip_search": True},
    # 21: 18 with each row's block scales solved again for its codes (refit_scales)
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"],
     "clip_search": True, "refit_scales": True},
    # 22: 21 with the 8-bit MatMuls in blocks of 64 (half the scales; 128 does not divide 576)
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"],
     "clip_search": True, "refit_scales": True, "int8_block_size": 64},
    # 23: 22 with the attention output projections at 8 bits too
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj", "attn/o_proj"],
     "clip_search": True, "refit_scales": True, "int8_block_size": 64},
    # 24: 22 with layers 11 and 29 (the most sensitive under min-max) wholly at 8 bits
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64,
     "int8_nodes": ["mlp/down_proj", "attn/qkv_proj", "layers\\.(11|29)/"],
     "clip_search": True, "refit_scales": True, "int8_block_size": 64},
    # 25: 22 with the LM head at 8 bits instead of the MLP down projections (the head's table then stays 4-bit
    # and unshared; sharing an 8-bit table would bring the size back within 0.20x)
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["attn/qkv_proj", "lm_head"],
     "clip_search": True, "refit_scales": True, "int8_block_size": 64},
    # 26: 22 with AWQ's activation-aware scaling of the norm-fed MatMuls (QKV, gate/up) before GPTQ
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj", "attn/qkv_proj"],
     "clip_search": True, "refit_scales": True, "int8_block_size": 64, "awq": True},
    # 27: 26 with QKV at 4 bits (AWQ's scaling is where QKV's error was)
    {"algorithm": "gptq", "symmetric": True, "block_size": 32, "accuracy_level": 4, "calibration_text": "VALID",
     "calibration_windows": 8, "calibration_rows": 64, "int8_nodes": ["mlp/down_proj"],
     "clip_search": True, "refit_scales": True, "int8_block_size": 64, "awq": True},
]


def main() -> int:
    """Quantize and measure every candidate."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", type=int, nargs="*", help="candidate indices to run")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import onnx

    from compressor.models.artifact import Artifact
    from compressor.models.loading import load_tokenizer
    from compressor.plugins.quantize_onnx import QuantizeOnnxConfig, _int4
    from compressor.tasks.text_generation import _Model, perplexity

    record = json.loads((args.run / "record.json").read_text())
    export = Artifact.load(next(Path(s["path"]) for s in record["steps"] if s["uses"] == "export-onnx"))
    valid = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
    tokenizer = load_tokenizer(export.path)

    from compressor.host import build_host
    from compressor.recipe.plan import build_plan
    from compressor.plugins.quantize_onnx import calibration_parts

    class Ctx:  # what _int4 reports into, and the recipe's data for GPTQ's calibration rows
        notes: dict = {}
        data = build_plan(Path(record["recipe_path"]), build_host()).data
        seed = record["seed"]

        def report(self, **values):
            self.notes.update(values)

    rows = []
    base = perplexity(_Model(export, args.threads), tokenizer, valid, args.tokens, args.window)["perplexity"]
    print(f"FP32 export: valid perplexity {base:.3f}", flush=True)
    for i, cand in enumerate(CANDIDATES):
        if args.only and i not in args.only:
            continue
        with tempfile.TemporaryDirectory() as work:
            target = Path(work) / "model.onnx"
            t0 = time.perf_counter()
            settings = {**cand, **({"calibration_text": str(valid)} if cand.get("calibration_text") else {})}
            config = QuantizeOnnxConfig(mode="int4", op_types=["MatMul", "Gather"], **settings)
            windows, train = calibration_parts(export, Ctx(), config) if config.algorithm == "gptq" else ([], [])
            sequences = windows + train if config.algorithm == "gptq" else None
            for f in export.path.iterdir():  # the tokenizer and configs beside the model, for the evaluator
                if f.name.startswith(("tokenizer", "special_tokens", "config", "generation", "chat_template",
                                      "genai_config")):
                    (Path(work) / f.name).write_bytes(f.read_bytes())
            if config.calibration_text:
                measured = tokenizer(valid.read_text(encoding="utf-8"))["input_ids"][: args.tokens]
                overlap = sum(any(s[j : j + 16] == measured[i : i + 16] for i in range(0, len(measured) - 15, 16))
                              for s in sequences for j in (0,))
                print(f"calibration windows starting inside the measured tokens: {overlap}", flush=True)
            _int4(export.model_file, target, config, Ctx(), sequences)
            seconds = time.perf_counter() - t0
            art = Artifact(path=Path(work), format="onnx", task="text-generation")
            ppl = perplexity(_Model(art, args.threads), tokenizer, valid, args.tokens, args.window)["perplexity"]
            rows.append({**cand, "perplexity": ppl, "change": ppl / base - 1, "mb": target.stat().st_size / 1e6,
                         "seconds": seconds, **{k: v for k, v in Ctx.notes.items() if k.startswith("awq")}})
            Ctx.notes.clear()
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nWikiText-2 valid, first {args.tokens} tokens in {args.window}-token windows; FP32 {base:.3f}\n")
    print("| algorithm | symmetric | block | accuracy_level | int8_nodes | perplexity | Δ | MB | quantize s |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['symmetric']} | {r['block_size']} | {r['accuracy_level']} | "
              f"{', '.join(r.get('int8_nodes', [])) or '—'} | "
              f"{r['perplexity']:.3f} | {100 * r['change']:+.1f}% | {r['mb']:.1f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
