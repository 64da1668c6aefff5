"""What onnxruntime's SkipLayerNormalization costs the edge model at batch 1: the run's final model against
the same graph with each SkipLayerNormalization written back as its residual Adds and a LayerNormalization,
loaded with and without onnxruntime's own SkipLayerNormFusion (which fuses them again at load), and as one
Sum and a LayerNormalization (a form that fusion does not match). Timed interleaved on dev sentences, with
the largest |logit difference| to the final model. Asserts nothing.

    compressor run recipes/minilm-sst2-edge.yaml --set steps.5.with.skip_layer_norm=true --out runs/edge-fused
    python bench/residual_layernorm.py runs/edge-fused [--rounds 10 --runs 100]

The run's final model must hold SkipLayerNormalization (optimize-onnx with skip_layer_norm true).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # int8_latency, beside this file


def unfused(model_file: Path, target: Path, use_sum: bool) -> Path:
    """The graph with every SkipLayerNormalization as Add(x, bias), Add(·, skip) (or one Sum) + LayerNormalization."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_file))
    nodes = []
    for node in model.graph.node:
        if node.op_type != "SkipLayerNormalization" or len(node.input) != 5 or len(node.output) != 1:
            nodes.append(node)
            continue
        x, skip, gamma, beta, bias = node.input
        out = node.output[0]
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        if use_sum:
            nodes.append(helper.make_node("Sum", [x, bias, skip], [out + "_sum"], name=node.name + "_sum"))
        else:
            nodes.append(helper.make_node("Add", [x, bias], [out + "_biased"], name=node.name + "_bias"))
            nodes.append(helper.make_node("Add", [out + "_biased", skip], [out + "_sum"], name=node.name + "_skip"))
        nodes.append(helper.make_node("LayerNormalization", [out + "_sum", gamma, beta], [out],
                                      name=node.name + "_norm", axis=-1, epsilon=epsilon))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))
    return target


def main() -> None:
    """Build the variants, time them interleaved, print medians, ratios and logit differences."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run of recipes/minilm-sst2-edge.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import onnx
    from int8_latency import dev_feeds, time_interleaved

    from compressor.models.loading import ort_session

    record = json.loads((args.run_dir / "record.json").read_text())
    final = Path(record["steps"][-1]["path"]) / "model.onnx"
    if not any(n.op_type == "SkipLayerNormalization" for n in onnx.load(str(final)).graph.node):
        raise SystemExit(f"{final} holds no SkipLayerNormalization: run the recipe with "
                         "--set steps.N.with.skip_layer_norm=true (N: its optimize-onnx step) and pass that run")
    work = Path(tempfile.mkdtemp(prefix="residual-layernorm-"))
    fused, fusion_off, fused_again, summed = ("final model (SkipLayerNormalization)",
                                              "Adds + LayerNormalization, SkipLayerNormFusion off",
                                              "Adds + LayerNormalization (fused again at load)",
                                              "Sum + LayerNormalization")
    adds = unfused(final, work / "adds.onnx", False)
    models = {fused: final, fusion_off: adds, fused_again: adds, summed: unfused(final, work / "sum.onnx", True)}
    disabled = {fusion_off: ["SkipLayerNormFusion"]}
    feeds = dev_feeds(Path(next(s["path"] for s in record["steps"] if s["uses"] == "export-onnx")))
    sessions = {k: ort_session(path, args.threads, disabled.get(k, ())) for k, path in models.items()}

    def logits(name: str, feed: dict[str, Any]) -> Any:
        names = {i.name for i in sessions[name].get_inputs()}
        return sessions[name].run(None, {n: v for n, v in feed.items() if n in names})[0]

    reference = [logits(fused, f) for f in feeds[:50]]
    diff = {k: max(float(np.abs(logits(k, f) - r).max()) for f, r in zip(feeds[:50], reference)) for k in models}
    times = time_interleaved(models, feeds, args.rounds, args.runs, args.threads, disabled)
    medians = {k: [statistics.median(v[i : i + args.runs]) for i in range(0, len(v), args.runs)]
               for k, v in times.items()}
    print(f"{'variant':<52} {'p50 ms':>8} {'per-round ratio':>16} {'max |Δlogit|':>13}")
    for name, values in medians.items():
        ratio = statistics.median(v / b for v, b in zip(values, medians[fused]))
        print(f"{name:<52} {statistics.median(values):>8.3f} {ratio:>15.3f}× {diff[name]:>13.2e}")


if __name__ == "__main__":
    main()
