"""Batch-1 latency of int8 variants of one ONNX model, measured interleaved so that machine drift
hits every variant alike: rounds of `--runs` calls per variant, in turn, `--rounds` times, over the
same real SST-2 dev sentences. Prints each variant's median and its ratio to Optimum's int8.
Asserts nothing; this is how quantize-onnx's dynamic defaults were chosen (see bench/RESULTS.md).

    python bench/int8_latency.py runs/bench-int8/artifacts/02-export-onnx [--rounds 10 --runs 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def variants(onnx_dir: Path, work: Path) -> dict[str, Path]:
    """Optimum's documented path and onnxruntime's quantize_dynamic with the settings we compare."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compare import optimum_int8

    out = {"optimum avx2 dynamic": next(optimum_int8(onnx_dir, work / "optimum").glob("*.onnx"))}
    source = str(onnx_dir / "model.onnx")
    settings = {
        "uint8, const-B MatMuls only (ours before)": dict(weight_type=QuantType.QUInt8),
        "uint8, every MatMul (attention too)": dict(weight_type=QuantType.QUInt8,
                                                    extra_options={"MatMulConstBOnly": False}),
        "int8, every MatMul": dict(weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": False}),
    }
    for name, kwargs in settings.items():
        target = work / f"{len(out)}.onnx"
        quantize_dynamic(source, str(target), **kwargs)
        out[name] = target
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    from transformers import AutoTokenizer

    from compressor.data import DataSource
    from compressor.evaluators.runtime import ort_session

    rows = DataSource("tsv", {"eval": Path(__file__).resolve().parents[2] / "shared/data/sst2/dev.tsv"},
                      "sentence", "label").load("eval")
    tokenizer = AutoTokenizer.from_pretrained(str(args.onnx_dir))
    feeds = [{k: v.astype(np.int64) for k, v in tokenizer([r.text], return_tensors="np").items()} for r in rows]
    work = Path(tempfile.mkdtemp(prefix="int8-latency-"))
    models = variants(args.onnx_dir, work)
    sessions = {name: ort_session(path, args.threads) for name, path in models.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        for feed in feeds[:20]:
            session.run(None, {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})
    for r in range(args.rounds):
        for name, session in sessions.items():
            names = {i.name for i in session.get_inputs()}
            for i in range(args.runs):
                feed = feeds[(r * args.runs + i) % len(feeds)]
                t0 = time.perf_counter()
                session.run(None, {k: v for k, v in feed.items() if k in names})
                times[name].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(times["optimum avx2 dynamic"])
    print(f"{'variant':<45} {'p50 ms':>8} {'p90 ms':>8} {'vs optimum':>10} {'size MB':>8}")
    for name, values in times.items():
        p50, p90 = statistics.median(values), float(np.percentile(values, 90))
        size = models[name].stat().st_size / 1e6
        print(f"{name:<45} {p50:8.3f} {p90:8.3f} {p50 / base:9.3f}× {size:8.2f}")


if __name__ == "__main__":
    main()
