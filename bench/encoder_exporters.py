"""torch.onnx's two exporters on one fine-tuned encoder: TorchScript (`dynamo=False`) against dynamo
(`torch.export` + onnxscript), and both against optimum-onnx 0.1.0's export on transformers 4.57 (the
exporter compressor used before transformers 5, run in bench/optimum_compat.py's side venv; `--no-optimum`
leaves it out), on the four things `export-onnx`'s default was chosen by:

- parity: the largest |logit difference| to PyTorch on the first 64 SST-2 dev sentences;
- fusions: what onnxruntime's transformer optimizer (optimize-onnx's settings) fuses in each graph;
- int8: SST-2 dev accuracy of each graph (fused where the optimizer fused attention) after onnxruntime's
  dynamic int8 quantization (int8 weights, per channel);
- batch-1 latency of the four models, timed interleaved in this process on real dev sentences.

    python bench/encoder_exporters.py [runs/minilm-sst2-int8/artifacts/01-finetune] [--rounds 6 --runs 100]

Needs a fine-tuned classifier directory (`compressor run recipes/minilm-sst2-int8.yaml` makes one).
Asserts nothing; docs/results.md records what it printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
FUSED = ("Attention", "SkipLayerNormalization", "BiasGelu", "LayerNormalization")


def dev_rows() -> list[Any]:
    """SST-2 dev rows."""
    from compressor.models.data import DataSource

    return DataSource("tsv", {"eval": ROOT.parent / "shared/data/sst2/dev.tsv"}, "sentence", "label").load("eval")


def onnx_logits(model_file: Path, tokenizer: Any, texts: list[str], threads: int) -> Any:
    """Logits of an ONNX classifier for `texts`, in padded batches of 32."""
    import numpy as np

    from compressor.models.loading import ort_session

    session = ort_session(model_file, threads)
    names = {i.name for i in session.get_inputs()}
    out = []
    for i in range(0, len(texts), 32):
        enc = tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="np")
        out.append(session.run(None, {k: v.astype(np.int64) for k, v in enc.items() if k in names})[0])
    return np.concatenate(out)


def fuse(model_file: Path, out_file: Path) -> dict[str, int]:
    """optimize-onnx's fusions (attention, skip LayerNorm, bias GELU; no embedding LayerNorm); the counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    optimized = optimize_model(str(model_file), model_type="bert", num_heads=0, hidden_size=0,
                               optimization_options=options, opt_level=0, use_gpu=False)
    optimized.save_model_to_file(str(out_file), use_external_data_format=False)
    counts = Counter(n.op_type for n in optimized.model.graph.node)
    return {op: counts[op] for op in FUSED}


def main() -> None:
    """Export, fuse, quantize and time with both exporters; print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=ROOT / "runs/minilm-sst2-int8/artifacts/01-finetune")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-optimum", action="store_true", help="skip the optimum-onnx (transformers 4.57) row")
    args = parser.parse_args()
    import numpy as np
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compressor.export.encoder import export_encoder
    from int8_latency import time_interleaved

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    model = AutoModelForSequenceClassification.from_pretrained(str(args.model)).eval()
    rows = dev_rows()
    texts, labels = [r.text for r in rows], np.asarray([int(r.label) for r in rows])  # SST-2: 0 negative, 1 positive
    enc = tokenizer(texts[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        reference = model(**enc).logits.numpy()
    work = Path(tempfile.mkdtemp(prefix="exporters-"))
    results: dict[str, dict[str, Any]] = {}
    timed: dict[str, Path] = {}
    exporters = ("torchscript", "dynamo") if args.no_optimum else ("torchscript", "dynamo", "optimum")
    if not args.no_optimum:
        from optimum_compat import optimum_produce

        optimum_produce([{"kind": "export", "dir": str(args.model), "out": str(work / "optimum"),
                          "task": "text-classification", "opset": 17}])
    for exporter in exporters:
        raw = work / f"{exporter}.onnx"
        if exporter == "optimum":
            (work / "optimum" / "model.onnx").replace(raw)
        else:
            export_encoder(model, tokenizer, raw, 17, exporter, per_token=False)
        parity = float(np.abs(onnx_logits(raw, tokenizer, texts[:64], args.threads) - reference).max())
        fused_file = work / f"{exporter}-fused.onnx"
        fused = fuse(raw, fused_file)
        source = fused_file if fused["Attention"] else raw
        int8 = work / f"{exporter}-int8.onnx"
        # fused graphs hold contrib ops that shape inference cannot type: their outputs are float
        quantize_dynamic(str(source), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        accuracy = {name: float((onnx_logits(path, tokenizer, texts, args.threads).argmax(-1) == labels).mean())
                    for name, path in (("fp32", source), ("int8", int8))}
        results[exporter] = {"parity": parity, "fused": fused, "accuracy": accuracy,
                             "size_mb": {"fp32": source.stat().st_size / 1e6, "int8": int8.stat().st_size / 1e6}}
        timed[f"{exporter} fp32{' fused' if fused['Attention'] else ''}"] = source
        timed[f"{exporter} int8"] = int8
    feeds = [{k: v.astype(np.int64) for k, v in tokenizer([t], return_tensors="np").items()} for t in texts]
    times = time_interleaved(timed, feeds, args.rounds, args.runs, args.threads)
    base = statistics.median(times[next(iter(timed))])
    print(f"model: {args.model.name} · torch {torch.__version__} · {args.rounds} rounds × {args.runs} calls, "
          f"{args.threads} threads, batch 1, SST-2 dev ({len(rows)} rows)\n")
    print("| exporter | parity (max |Δlogit|) | fused Attention / SkipLN / BiasGelu | fp32 acc | int8 acc | "
          "int8 MB | p50 fp32 ms | p50 int8 ms | int8 ×TorchScript fp32 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for exporter, r in results.items():
        fp32_name = next(n for n in timed if n.startswith(exporter) and "fp32" in n)
        p50_fp32, p50_int8 = statistics.median(times[fp32_name]), statistics.median(times[f"{exporter} int8"])
        f = r["fused"]
        print(f"| {exporter} | {r['parity']:.2e} | {f['Attention']} / {f['SkipLayerNormalization']} / "
              f"{f['BiasGelu']} | {r['accuracy']['fp32']:.4f} | {r['accuracy']['int8']:.4f} | "
              f"{r['size_mb']['int8']:.2f} | {p50_fp32:.3f} | {p50_int8:.3f} | {p50_int8 / base:.3f}× |")
    (work / "results.json").write_text(json.dumps({"results": results, "p50_ms": {k: statistics.median(v)
                                                                                  for k, v in times.items()}}))


if __name__ == "__main__":
    main()
