"""The accuracy/size/latency guard applied to the final artifact of a run."""

from __future__ import annotations

from typing import Any

from compressor.recipe.schema import GuardSpec


def baseline(artifacts: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The first artifact that has a value for `key` (the reference for changes and ratios)."""
    return next((a for a in artifacts if _value(a, key) is not None), None)


def _value(artifact: dict[str, Any], key: str) -> float | None:
    if key == "metric":
        return artifact.get(artifact["metric"]) if artifact.get("metric") else None
    if key in ("p50_ms", "p90_ms", "throughput"):
        return (artifact.get("latency") or {}).get(key)
    return artifact.get(key)


def worsening(artifact: dict[str, Any], reference: float, value: float) -> float:
    """How much worse `value` is than `reference` for this artifact's metric (its record says which way is
    better: accuracy up, perplexity down); negative when it improved."""
    return _worse_by(reference, value, artifact.get("higher_is_better", True))


def _worse_by(reference: float, value: float, higher_is_better: bool) -> float:
    return reference - value if higher_is_better else value - reference


def _reference(artifacts: list[dict[str, Any]], key: str, baseline_index: int | None) -> dict[str, Any] | None:
    """The artifact a budget on `key` counts from: artifact `baseline_index` (None when it has no `key`), or
    with no baseline named the first artifact that has one."""
    if baseline_index is None:
        return baseline(artifacts, key)
    return next((a for a in artifacts if a["index"] == baseline_index and _value(a, key) is not None), None)


def _over_budget(name: str, higher_is_better: bool, drop: float, base: dict[str, Any], reference: float,
                 value: float, allowed: float) -> str:
    """The failure of a budget on metric `name`."""
    return (f"{name} {'dropped' if higher_is_better else 'rose'} by {drop:.4f} from {base['name']} "
            f"({reference:.4f} → {value:.4f}); the budget is {allowed:.4f}")


def check_guard(guard: GuardSpec, artifacts: list[dict[str, Any]], baseline_index: int | None = None,
                higher_is_better: dict[str, bool] | None = None) -> dict[str, Any]:
    """Compare the last artifact with the budgets; returns {passed, failures, checks}. The accuracy budgets are
    measured from artifact `baseline_index` (guard.baseline, resolved by the plan), by default from the first
    artifact that was measured; `higher_is_better` gives the direction of each metric in guard.metrics."""
    final = artifacts[-1]
    failures: list[str] = []
    crossed: int | None = None
    unmeasured: list[str] = []
    checks: list[dict[str, Any]] = []
    if guard.max_accuracy_drop is not None:
        base = _reference(artifacts, "metric", baseline_index)
        value = _value(final, "metric")
        if base is None and value is not None and baseline_index is not None:
            unmeasured.append(f"guard.baseline, artifact {baseline_index}, has no measured {final['metric']}")
        elif base is None or value is None:
            unmeasured.append("max_accuracy_drop is set but no accuracy was measured (is data.eval given?)")
        else:
            ref = _value(base, "metric")
            drop = worsening(final, ref, value)
            allowed = guard.max_accuracy_drop * (abs(ref) if guard.relative else 1.0)
            checks.append({"check": "max_accuracy_drop", "metric": final["metric"], "baseline": base["name"],
                           "reference": ref,
                           "value": value, "drop": drop, "allowed": allowed, "passed": drop <= allowed + 1e-12})
            crossed = next((a["index"] for a in artifacts if a["index"] > base["index"]
                            and _value(a, "metric") is not None and worsening(a, ref, _value(a, "metric")) > allowed + 1e-12),
                           None)
            if drop > allowed + 1e-12:
                failures.append(_over_budget(final["metric"], final.get("higher_is_better", True), drop, base, ref,
                                             value, allowed))
    for name, budget in guard.metrics.items():
        failure = _metric_budget(name, budget, (higher_is_better or {}).get(name, True), artifacts, baseline_index,
                                 checks, unmeasured)
        if failure:
            failures.append(failure)
    if guard.max_size_mb is not None:
        size_mb = final["size_bytes"] / 1e6
        ok = size_mb <= guard.max_size_mb
        checks.append({"check": "max_size_mb", "value": size_mb, "allowed": guard.max_size_mb, "passed": ok})
        if not ok:
            failures.append(f"size {size_mb:.2f} MB exceeds max_size_mb {guard.max_size_mb}")
    if guard.max_latency_ms is not None:
        p50 = _value(final, "p50_ms")
        if p50 is None:
            unmeasured.append("max_latency_ms is set but latency was not measured (evaluate.latency is off)")
        else:
            ok = p50 <= guard.max_latency_ms
            checks.append({"check": "max_latency_ms", "value": p50, "allowed": guard.max_latency_ms, "passed": ok})
            if not ok:
                failures.append(f"p50 latency {p50:.2f} ms exceeds max_latency_ms {guard.max_latency_ms}")
    failures += unmeasured
    return {"passed": not failures, "failures": failures, "checks": checks, "unmeasured": unmeasured,
            "crossed_at": crossed}


def _metric_budget(name: str, budget: float, higher: bool, artifacts: list[dict[str, Any]],
                   baseline_index: int | None, checks: list[dict[str, Any]], unmeasured: list[str]) -> str | None:
    """One guard.metrics budget: appends its check (or what was not measured); returns its failure, if any."""
    final = artifacts[-1]
    base, value = _reference(artifacts, name, baseline_index), _value(final, name)
    if base is None or value is None:
        where = "the baseline" if base is None else f"the final artifact ({final['name']})"
        unmeasured.append(f"guard.metrics.{name} is set but {where} has no measured {name}")
        return None
    ref = _value(base, name)
    drop = _worse_by(ref, value, higher)
    passed = drop <= budget + 1e-12
    checks.append({"check": f"metrics.{name}", "metric": name, "baseline": base["name"], "reference": ref,
                   "value": value, "drop": drop, "allowed": budget, "higher_is_better": higher, "passed": passed})
    return None if passed else _over_budget(name, higher, drop, base, ref, value, budget)
