"""Where an ONNX model's time goes, by operator type, from onnxruntime's own profiler. Profiling adds
overhead, so compare shares, not absolute times. Asserts nothing; this is how the edge model's embedding
lookups and unfused attention were found, and why an int4 LLM decodes only 2.3-2.8x faster than FP32.

    python bench/profile_ops.py runs/minilm-sst2-edge/artifacts/08-quantize-onnx [--sentences 300]
    python bench/profile_ops.py RUN_DIR/artifacts/03-quantize-onnx [--prompt 128 --tokens 64]

(RUN_DIR: a run directory of an LLM recipe, such as recipes/smollm2-sst2-int4.yaml's, under runs/.)

A classifier is run on real SST-2 dev sentences, per sentence. A causal LM with a KV cache is given a
`--prompt`-token prompt and `--tokens` greedy steps through the runtime the recipe measures with
(compressor/bundle/device/generation_runtime.py, with its shared cache buffer where the graph asks for one); only the decode steps count, per generated token, with a second table
of the MatMuls (MatMul or MatMulNBits) by projection, summed over the layers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _run_classifier(session, model_dir: Path, sentences: int) -> int:
    from int8_latency import dev_feeds

    names = {i.name for i in session.get_inputs()}
    feeds = dev_feeds(model_dir)[:sentences]
    for feed in feeds:
        session.run(None, {k: v for k, v in feed.items() if k in names})
    return len(feeds)


def _run_decoder(session, model_dir: Path, prompt: int, tokens: int) -> int:
    from compressor.bundle.device.generation_runtime import OnnxCausalLM

    lm = OnnxCausalLM(model_dir / "model.onnx", session=session)
    logits, cache = lm.prefill(list(range(1000, 1000 + prompt)), prompt + tokens)
    for _ in range(tokens):
        logits = lm.decode(int(logits.argmax()), cache)
    return tokens


def _one_token_step(event: dict) -> bool:
    """Whether a kernel event belongs to a decode step (its first input spans one position), not the prompt."""
    shapes = event["args"].get("input_type_shape") or [{}]
    first = next(iter(shapes[0].values()), [])
    return len(first) >= 2 and first[1] == 1


def main() -> None:
    """Profile the model and print kernel time by operator type (and, for a causal LM, by MatMul)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="an artifact directory with model.onnx and its tokenizer")
    parser.add_argument("--sentences", type=int, default=300, help="classifier: dev sentences")
    parser.add_argument("--prompt", type=int, default=128, help="causal LM: prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="causal LM: greedy tokens profiled")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="profile-ops-")) / "ort")
    session = ort.InferenceSession(str(args.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    decoder = any(i.name.startswith("past_key_values.") for i in session.get_inputs())
    unit = "token" if decoder else "sentence"
    count = (_run_decoder(session, args.model_dir, args.prompt, args.tokens) if decoder
             else _run_classifier(session, args.model_dir, args.sentences))
    events = json.loads(Path(session.end_profiling()).read_text())
    micros, nodes, matmuls = Counter(), Counter(), Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if decoder and not _one_token_step(event):
            continue
        op = event["args"]["op_name"]
        micros[op] += event["dur"]
        nodes[op] += 1
        if decoder and op in ("MatMul", "MatMulNBits"):
            matmuls[re.sub(r"layers\.\d+", "*", event["name"][: -len("_kernel_time")])] += event["dur"]
    total = sum(micros.values())
    print(f"{args.model_dir}: {total / count:.0f} µs of kernel time per {unit} (profiled)")
    print(f"{'operator':<34} {'µs/' + unit:>12} {'share':>7} {'nodes':>6}")
    for op, us in micros.most_common():
        print(f"{op:<34} {us / count:12.1f} {100 * us / total:6.1f}% {nodes[op] / count:6.0f}")
    if matmuls:
        print(f"\n{'MatMul (summed over layers)':<50} {'µs/token':>10}")
        for name, us in matmuls.most_common():
            print(f"{name:<50} {us / count:10.1f}")


if __name__ == "__main__":
    main()
