"""What the last steps of the edge recipe contribute to its batch-1 latency, measured interleaved:
the same trimmed, distilled export quantized as the run's int8 step did (its per_channel and reduce_range),
then int4 embedding tables, with and without optimize-onnx's fusions and with the int4 tables in onnxruntime's
int4 type or packed two to a uint8 (what quantize-onnx writes). Prints each variant's median and its
ratio to the unfused, int4-typed variant. Asserts nothing.

    python bench/edge_latency.py runs/minilm-sst2-edge [--rounds 10 --runs 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def variants(run_dir: Path, work: Path) -> dict[str, Path]:
    """The four variants, built with onnxruntime's quantizers from the run's export and fused model."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from compressor.plugins.quantize_onnx import QuantizeOnnxConfig, blockwise_int4, pack_gather_tables

    record = json.loads((run_dir / "record.json").read_text())
    paths = {s["uses"]: Path(s["path"]) / "model.onnx" for s in record["steps"]}
    int8_step = next(s["config"] for s in record["steps"] if s["uses"] == "quantize-onnx")
    logging.getLogger().setLevel(logging.ERROR)
    out: dict[str, Path] = {}
    for fused, source, op_types in ((False, paths["export-onnx"], ["MatMul"]),
                                    (True, paths["optimize-onnx"], ["MatMul", "Attention"])):
        int8 = work / f"int8-{fused}.onnx"
        quantize_dynamic(str(source), str(int8), per_channel=int8_step["per_channel"],
                         reduce_range=int8_step["reduce_range"], op_types_to_quantize=op_types,
                         weight_type=QuantType.QInt8 if int8_step["weight_type"] == "int8" else QuantType.QUInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        # the recipe's last step: int4 blocks of 32 on the embedding tables
        int4 = blockwise_int4(onnx.load(str(int8)), QuantizeOnnxConfig(mode="int4", op_types=["Gather"]),
                              ("Gather",)).model
        label = "fused" if fused else "unfused"
        out[f"{label}, int4-typed tables"] = work / f"{label}-int4.onnx"
        onnx.save(int4, str(out[f"{label}, int4-typed tables"]))
        pack_gather_tables(int4)
        out[f"{label}, uint8-packed tables"] = work / f"{label}-uint8.onnx"
        onnx.save(int4, str(out[f"{label}, uint8-packed tables"]))
    return out


def main() -> None:
    """Build the variants, time them interleaved with the recipe's final model, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run of recipes/minilm-sst2-edge.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from int8_latency import dev_feeds, print_table, time_interleaved

    record = json.loads((args.run_dir / "record.json").read_text())
    export = Path(next(s["path"] for s in record["steps"] if s["uses"] == "export-onnx"))
    models = variants(args.run_dir, Path(tempfile.mkdtemp(prefix="edge-latency-")))
    models["recipe's final model"] = Path(record["steps"][-1]["path"]) / "model.onnx"
    times = time_interleaved(models, dev_feeds(export), args.rounds, args.runs, args.threads)
    print_table(models, times, "unfused, int4-typed tables", "vs unfused")


if __name__ == "__main__":
    main()
