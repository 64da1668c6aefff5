"""Where an ONNX model's batch-1 time goes, by operator type, from onnxruntime's own profiler:
the model is run on real SST-2 dev sentences with profiling on, and the kernel times of each
operator type are summed. Profiling adds overhead, so compare shares, not absolute times.
Asserts nothing; this is how the edge model's embedding lookups and unfused attention were found.

    python bench/profile_ops.py runs/minilm-sst2-edge/artifacts/08-quantize-onnx [--sentences 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    """Profile the model on dev sentences and print kernel time by operator type."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="an artifact directory with model.onnx and its tokenizer")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime as ort

    from int8_latency import dev_feeds

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="profile-ops-")) / "ort")
    session = ort.InferenceSession(str(args.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = dev_feeds(args.model_dir)[: args.sentences]
    for feed in feeds:
        session.run(None, {k: v for k, v in feed.items() if k in names})
    events = json.loads(Path(session.end_profiling()).read_text())
    micros, nodes = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    total = sum(micros.values())
    print(f"{args.model_dir}: {total / len(feeds):.0f} µs of kernel time per sentence (profiled)")
    print(f"{'operator':<28} {'µs/sentence':>12} {'share':>7} {'nodes':>6}")
    for op, us in micros.most_common():
        print(f"{op:<28} {us / len(feeds):12.1f} {100 * us / total:6.1f}% {nodes[op] / len(feeds):6.0f}")


if __name__ == "__main__":
    main()
