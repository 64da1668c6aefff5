"""int4 settings for an LLM, chosen on WikiText-2 *valid* (never on test, which the recipe reports).

    python bench/int4_candidates.py runs/smollm2-int4 [--tokens 4096] [--window 512]

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

    from compressor.artifact import Artifact
    from compressor.evaluators.runtime import load_tokenizer
    from compressor.plugins.quantize_onnx import QuantizeOnnxConfig, _int4
    from compressor.tasks.text_generation import _Model, perplexity

    record = json.loads((args.run / "record.json").read_text())
    export = Artifact.load(next(Path(s["path"]) for s in record["steps"] if s["uses"] == "export-onnx"))
    valid = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
    tokenizer = load_tokenizer(export.path)

    class Ctx:  # what _int4 reports into
        notes: dict = {}

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
            config = QuantizeOnnxConfig(mode="int4", op_types=["MatMul", "Gather"], **cand)
            _int4(export.model_file, target, config, Ctx())
            seconds = time.perf_counter() - t0
            for f in export.path.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "config", "generation", "chat_template")):
                    (Path(work) / f.name).write_bytes(f.read_bytes())
            art = Artifact(path=Path(work), format="onnx", task="text-generation")
            ppl = perplexity(_Model(art, args.threads), tokenizer, valid, args.tokens, args.window)["perplexity"]
            rows.append({**cand, "perplexity": ppl, "change": ppl / base - 1, "mb": target.stat().st_size / 1e6,
                         "seconds": seconds})
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
