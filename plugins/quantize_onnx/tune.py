"""Accuracy-aware int8 quantization: `quantize-onnx mode: auto`.

ONNX Runtime's int8 kernels differ between CPU classes (compressor.run.cpu), and so does a quantized
model's accuracy. So the settings are not derived from the CPU's flags: they are measured on the
machine that runs the recipe, on tuning rows (data.validation, or train rows held out of every other
step), never on the eval rows the report quotes.

Candidates are tried in the order of what they give the user, fastest and smallest first, and the
search stops at the first within the accuracy budget:

1. int8 weights, per tensor (the fastest kernels);
2. int8 weights, per channel;
3. uint8 weights, per tensor, then per channel (exact U8U8 kernels on every x86 CPU);
4. int8 weights with 7-bit range (`reduce_range`), per channel;
5. candidate 1 with the most sensitive nodes left in float, one more at a time. Sensitivity is
   measured: each weight node runs alone, float and quantized with onnxruntime's real kernels, on
   the activations the float model gives it for tuning rows; the larger its output error, the
   more sensitive it is.

Every candidate tried is recorded (settings, tuning-set metric and change, size, batch-1 p50),
with the one chosen and why. When none is within budget the most accurate is kept and the record
says so; the recipe's guard then decides.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compressor.models.artifact import Artifact, copy_companions

#: A node whose float weights are more than this share of the model's weights is never left in float:
#: it would cost more size than a search for speed and accuracy can justify (the embedding tables).
MAX_EXCLUDED_SHARE = 0.10
#: Rows whose activations feed the per-node sensitivity measurement.
SENSITIVITY_ROWS = 32


@dataclass
class Candidate:
    """One set of dynamic int8 settings."""

    name: str
    weight_type: str
    per_channel: bool
    reduce_range: bool = False
    excluded: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """The settings as the record shows them."""
        out = asdict(self)
        out.pop("name")
        out["excluded"] = list(self.excluded)
        return out


@dataclass
class Trial:
    """A candidate measured on the tuning rows."""

    candidate: Candidate
    metric: float
    change: float
    size_bytes: int
    p50_ms: float | None
    within_budget: bool
    seconds: float
    path: Path = field(repr=False, default=Path())

    def row(self) -> dict[str, Any]:
        """The record's row for this trial."""
        return {"name": self.candidate.name, **self.candidate.settings(), "metric": self.metric,
                "change": self.change, "size_bytes": self.size_bytes, "p50_ms": self.p50_ms,
                "within_budget": self.within_budget, "seconds": round(self.seconds, 2)}


def base_candidates() -> list[Candidate]:
    """The same-size candidates, fastest first."""
    return [Candidate("int8 per-tensor", "int8", False), Candidate("int8 per-channel", "int8", True),
            Candidate("uint8 per-tensor", "uint8", False), Candidate("uint8 per-channel", "uint8", True),
            Candidate("int8 per-channel, reduce_range", "int8", True, True)]


def quantize_dynamic_file(source: Path, target: Path, candidate: Candidate, op_types: list[str] | None,
                          exclude: list[str]) -> None:
    """onnxruntime's quantize_dynamic with a candidate's settings."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: ONNX shape inference does not type the outputs of onnxruntime's contrib ops
    # (Attention, SkipLayerNormalization from optimize-onnx); they are float.
    quantize_dynamic(source, str(target), per_channel=candidate.per_channel, reduce_range=candidate.reduce_range,
                     op_types_to_quantize=op_types, nodes_to_exclude=list(exclude) + list(candidate.excluded),
                     weight_type=QuantType.QInt8 if candidate.weight_type == "int8" else QuantType.QUInt8,
                     extra_options={"DefaultTensorType": 1})  # onnx.TensorProto.FLOAT


#: Operator types quantize_dynamic turns into integer operators, and the input that holds the weight.
WEIGHT_INPUT = {"MatMul": 1, "Attention": 1, "Gather": 0, "Conv": 1}


def weight_nodes(model: Any, op_types: list[str] | None, exclude: list[str]) -> list[tuple[str, int]]:
    """(node name, weight bytes) of the nodes dynamic quantization would quantize."""
    import numpy as np

    sizes = {t.name: int(np.prod(t.dims)) * 4 for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or (op_types and node.op_type not in op_types) or node.name in exclude or not node.name:
            continue
        if len(node.input) > index and node.input[index] in sizes:
            out.append((node.name, sizes[node.input[index]]))
    return out


def _capture(model: Any, names: list[str], feeds: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """The values of intermediate tensors `names` in the float model, for each feed."""
    import onnx
    from onnx import TensorProto, helper

    from compressor.models.loading import ort_session_from

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {v.name: v for v in list(probe.graph.value_info) + list(probe.graph.input) + list(probe.graph.output)}
    outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name in outputs:
            continue
        elem = known[name].type.tensor_type.elem_type if name in known else TensorProto.FLOAT
        probe.graph.output.append(helper.make_tensor_value_info(name, elem or TensorProto.FLOAT, None))
    session = ort_session_from(probe.SerializeToString(), threads)
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def channel_error(noise: Any, signal: Any) -> float:
    """Mean over output channels of each channel's noise-to-signal ratio. Per channel, because what follows
    a layer (LayerNorm, tanh, attention's softmax) does not weigh channels by their energy: one loud
    channel must not hide the others being crushed. Channels near silence are floored at 1% of the mean
    channel energy, so that a dead channel's rounding does not dominate."""
    import numpy as np

    floor = 1e-2 * float(np.mean(signal)) + 1e-30
    return float(np.mean(noise / np.maximum(signal, floor)))


def node_sensitivity(model_file: Path, candidate: Candidate, nodes: list[str], feeds: list[dict[str, Any]],
                     threads: int) -> dict[str, float]:
    """Output error (channel_error of quantized against float) of each node run alone with the candidate's
    settings, on the activations the float model gives it: measured with this CPU's int8 kernels."""
    import numpy as np
    import onnx
    from onnx import helper

    from compressor.models.loading import ort_session_from

    model = onnx.load(str(model_file))
    model = onnx.shape_inference.infer_shapes(model)
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    dynamic = {name: [i for i in by_name[name].input if i and i not in inits] for name in nodes}
    captured = _capture(model, sorted({i for ins in dynamic.values() for i in ins}), feeds, threads)
    errors: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="compressor-sensitivity-") as work:
        for name in nodes:
            node = by_name[name]
            sample = captured[0]
            graph = helper.make_graph(
                [node], f"single-{name}",
                [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(sample[i].dtype), None)
                 for i in dynamic[name]],
                [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                [inits[i] for i in node.input if i in inits])
            single = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
            float_file, quant_file = Path(work) / "float.onnx", Path(work) / "quant.onnx"
            onnx.save(single, str(float_file))
            quantize_dynamic_file(float_file, quant_file, candidate, None, [])
            reference = ort_session_from(float_file.read_bytes(), threads)
            quantized = ort_session_from(quant_file.read_bytes(), threads)
            noise = signal = 0.0
            for values in captured:
                inputs = {i: values[i] for i in dynamic[name]}
                want = reference.run(None, inputs)[0].astype(np.float64)
                got = quantized.run(None, inputs)[0].astype(np.float64)
                want, got = want.reshape(-1, want.shape[-1]), got.reshape(-1, got.shape[-1])
                noise = noise + ((got - want) ** 2).sum(0)
                signal = signal + (want ** 2).sum(0)
            errors[name] = channel_error(noise, signal)
    return errors


def matmul_form(model_file: Path, target: Path) -> Path:
    """The model with every Gemm written as MatMul + Add, as onnxruntime's quantizer rewrites it before it
    quantizes: node names then stay the same from the sensitivity measurement to `nodes_to_exclude`."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = ONNXModel(onnx.load(str(model_file)))
    model.replace_gemm_with_matmul()
    onnx.save(model.model, str(target))
    return target


def rank_nodes(artifact: Artifact, source: Path, candidate: Candidate, config: Any, rows: list[Any],
               threads: int) -> dict[str, float]:
    """The weight nodes that may be left in float (none holding more than MAX_EXCLUDED_SHARE of the
    weights), by measured sensitivity to `candidate`'s settings, most sensitive first."""
    import onnx

    from compressor.models.loading import load_runner

    model = onnx.load(str(source), load_external_data=False)
    total = sum(size for _, size in weight_nodes(model, None, []))
    nodes = [n for n, size in weight_nodes(model, config.op_types, config.exclude_nodes)
             if size <= MAX_EXCLUDED_SHARE * total]
    runner = load_runner(artifact, threads)
    feeds = [{k: v.astype("int64") for k, v in runner.encode([r.text]).items() if k in runner.input_names}
             for r in rows]
    errors = node_sensitivity(source, candidate, nodes, feeds, threads)
    return dict(sorted(errors.items(), key=lambda kv: -kv[1]))


def _companion_dir(artifact: Artifact, root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    copy_companions(artifact, path)
    return path


def search(artifact: Artifact, config: Any, ctx: Any) -> dict[str, Any]:
    """Run the candidate search, write the chosen model as ctx.out_dir/model.onnx; returns the record's
    `search` note."""
    from compressor.models.data import TUNE
    from compressor.evaluate.base import EvalSettings
    from compressor.evaluate.measure import model_bytes
    from compressor.host import current_host
    from compressor.models.training import sample_rows

    t0 = time.perf_counter()
    evaluator = current_host().evaluator_for(artifact.task, "onnx")
    if evaluator is None:
        from compressor.errors import StepError

        raise StepError(f"mode: auto measures candidates, and no evaluator measures {artifact.task} on onnx",
                        hint="use mode: dynamic with explicit settings")
    rows = sample_rows(ctx.data.load(TUNE), config.tuning_rows, ctx.seed)
    latency_threads = ctx.recipe.evaluate.latency.threads if ctx.recipe and ctx.recipe.evaluate.latency else 2
    settings = EvalSettings(threads=latency_threads, batch_sizes=(1,), runs=50, warmup=10, latency=True)
    metric = evaluator.metric
    higher_is_better = current_host().task(artifact.task).metric_named(metric).higher_is_better
    budget = config.max_accuracy_drop
    work = Path(tempfile.mkdtemp(prefix=".search-", dir=ctx.out_dir))
    try:
        base = evaluator.evaluate(artifact, rows, settings)
        reference = base[metric]
        if config.relative_drop:
            budget = budget * abs(reference)
        trials: list[Trial] = []
        source = matmul_form(artifact.model_file, work / "float.onnx")

        def attempt(candidate: Candidate) -> Trial:
            started = time.perf_counter()
            path = _companion_dir(artifact, work, f"{len(trials):02d}")
            quantize_dynamic_file(source, path / "model.onnx", candidate, config.op_types, config.exclude_nodes)
            trial_artifact = artifact.derive(path, format="onnx", quantized="candidate")
            measured = evaluator.evaluate(trial_artifact, rows, settings)
            change = measured[metric] - reference
            drop = -change if higher_is_better else change
            trial = Trial(candidate, measured[metric], change, model_bytes(trial_artifact),
                          (measured.get("latency") or {}).get("p50_ms"), drop <= budget + 1e-12,
                          time.perf_counter() - started, path / "model.onnx")
            trials.append(trial)
            ctx.log(f"  {candidate.name}: {metric} {measured[metric]:.4f} ({change:+.4f}) "
                    f"{'within' if trial.within_budget else 'outside'} the budget")
            return trial

        chosen = next((t for t in map(attempt, base_candidates()) if t.within_budget), None)
        sensitivity: dict[str, float] = {}
        if chosen is None and config.max_excluded:
            first = trials[0].candidate
            sensitivity = rank_nodes(artifact, source, first, config, rows[:SENSITIVITY_ROWS], ctx.threads)
            ranked = list(sensitivity)
            for k in range(1, min(config.max_excluded, len(ranked)) + 1):
                trial = attempt(Candidate(f"{first.name}, {k} most sensitive in float", first.weight_type,
                                          first.per_channel, first.reduce_range, tuple(ranked[:k])))
                if trial.within_budget:
                    chosen = trial
                    break
        if chosen is not None:
            reason = (f"the first candidate, in order of speed and size, within the budget of {budget:.4f} "
                      f"{metric} on the tuning rows")
        else:
            best = max(trials, key=lambda t: (t.metric if higher_is_better else -t.metric, -trials.index(t)))
            chosen = best
            reason = (f"no candidate was within the budget of {budget:.4f}; kept the most accurate on the tuning "
                      f"rows, and the guard decides")
        target = ctx.out_dir / "model.onnx"
        shutil.copy2(chosen.path, target)
        note = {"tuning_rows": len(rows), "tuning_source": ctx.data.tuning_source(), "metric": metric,
                "reference": reference, "budget": budget, "within_budget": chosen.within_budget,
                "chosen": chosen.candidate.name, "reason": reason, "candidates": [t.row() for t in trials],
                "sensitivity": {k: float(f"{v:.4g}") for k, v in sensitivity.items()},
                "seconds": round(time.perf_counter() - t0, 1)}
        from compressor.run.cpu import describe

        note["cpu"] = describe()
        return note
    finally:
        shutil.rmtree(work, ignore_errors=True)
