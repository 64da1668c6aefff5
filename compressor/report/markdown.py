"""report.md and report.json: one row per artifact, with changes against the baseline."""

from __future__ import annotations

from typing import Any

from compressor.run.guard import _value, baseline


def report_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per artifact: metric and its change, size and ×smaller, latency and ×faster, throughput."""
    artifacts = record["artifacts"]
    base_metric = baseline(artifacts, "metric")
    base_size = baseline(artifacts, "size_bytes")
    base_lat = baseline(artifacts, "p50_ms")
    rows = []
    for a in artifacts:
        metric = _value(a, "metric")
        p50 = _value(a, "p50_ms")
        row = {
            "index": a["index"], "artifact": a["name"], "format": a["format"], "metric_name": a.get("metric"),
            "metric": metric, "higher_is_better": a.get("higher_is_better", True),
            "metric_change": metric - _value(base_metric, "metric") if metric is not None and base_metric else None,
            "size_mb": a["size_bytes"] / 1e6,
            "x_smaller": base_size["size_bytes"] / a["size_bytes"] if base_size and a["size_bytes"] else None,
            "parameters": a.get("parameters"), "p50_ms": p50, "p90_ms": _value(a, "p90_ms"),
            "x_faster": _value(base_lat, "p50_ms") / p50 if p50 and base_lat else None,
            "throughput": _value(a, "throughput"), "note": a.get("skipped"),
        }
        rows.append(row)
    return rows


def fmt_value(value: Any, spec: str, suffix: str = "") -> str:
    """A figure formatted for a table, or an en dash when it was not measured."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def fmt_note(value: Any) -> str:
    """A step's note for a table cell: floats to 3 significant digits, lists and mappings on one line."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt_note(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_note(v) for v in value) + "]"
    return str(value)


def _step_class(uses: str) -> Any:
    """The registered step class a record's step entry names (None: its plugin is not loaded now)."""
    from compressor.host import current_host

    return current_host().steps.get(uses)


def step_sections(record: dict[str, Any]) -> list[str]:
    """What each step adds to the report (its report_sections), in step order."""
    lines: list[str] = []
    for s in record["steps"]:
        cls = _step_class(s["uses"])
        section = cls.report_sections(s) if cls else []
        if section:
            lines += ["", *section]
    return lines


def task_of(record: dict[str, Any]) -> Any:
    """The registered task of the run's model (None: unknown here)."""
    from compressor.host import current_host

    host = current_host()
    return host.tasks.get(((record.get("recipe") or {}).get("model") or {}).get("task", ""))


def task_sections(record: dict[str, Any]) -> list[str]:
    """What the run's task adds to the report after the artifacts table (its report_sections)."""
    task = task_of(record)
    return task.report_sections(record) if task else []


def render_markdown(record: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown page."""
    env = record["environment"]
    ev = record.get("evaluation", {})
    metric = next((r["metric_name"] for r in rows if r["metric_name"]), "metric")
    lines = [f"# {record['name']}", "",
             f"Status: **{record['status']}**"
             + (f" · guard: {'passed' if record['guard']['passed'] else 'FAILED'}" if "guard" in record else ""),
             "",
             f"| # | artifact | format | {metric} | Δ {metric} | size (MB) | ×smaller | parameters | p50 ms (b1) "
             f"| p90 ms (b1) | ×faster | throughput/s (b{ev.get('batch_sizes', [32])[-1]}) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['index']} | {r['artifact']} | {r['format']} | {fmt_value(r['metric'], '.4f')} | "
            f"{fmt_value(r['metric_change'], '+.4f')} | {fmt_value(r['size_mb'], '.2f')} | {fmt_value(r['x_smaller'], '.2f', '×')} | "
            f"{fmt_value(r['parameters'], ',')} | {fmt_value(r['p50_ms'], '.2f')} | {fmt_value(r['p90_ms'], '.2f')} | "
            f"{fmt_value(r['x_faster'], '.2f', '×')} | {fmt_value(r['throughput'], '.1f')} |")
    lines += task_sections(record)
    notes = [f"- {r['artifact']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines += ["", "Not measured:", *notes]
    if record.get("guard"):
        lines += ["", "## Guard", ""]
        g = record["guard"]
        for c in g["checks"]:
            verdict = "ok" if c["passed"] else "FAILED"
            if "drop" in c:  # max_accuracy_drop and guard.metrics
                lines.append(f"- {c.get('metric', 'metric')} drop from {c['baseline']}: {c['drop']:+.4f} ({c['reference']:.4f} → "
                             f"{c['value']:.4f}), allowed {c['allowed']:.4f} — {verdict}")
            else:
                lines.append(f"- {c['check']}: {c['value']:.4f} (allowed {c['allowed']:.4f}) — {verdict}")
        if not g["checks"] and not g["failures"]:
            lines.append("- no budget set")
        lines += [f"- FAILED: {f}" for f in g.get("unmeasured", [])]
    lines += ["", "## Steps", "", "| step | seconds | cached | notes |", "|---|---:|---|---|"]
    for s in record["steps"]:
        hidden = getattr(_step_class(s["uses"]), "section_notes", ())
        notes_ = ", ".join(f"{k}={fmt_note(v)}" for k, v in s["notes"].items() if k not in hidden)
        lines.append(f"| {s['index']}: {s['uses']} | {s['seconds']:.1f} | {'yes' if s['cached'] else 'no'} | {notes_} |")
    lines += step_sections(record)
    lines += ["", "## Reproducibility", "",
              f"- recipe: `{record['recipe_path']}` (sha256 `{record['recipe_hash'][:16]}…`)",
              f"- data sha256: `{(record['data_hash'] or '–')[:16]}…` · seed: {record['seed']}",
              f"- measured on: {env['cpu']} ({env['cpu_count']} CPUs, int8 kernels "
              f"{env.get('int8_kernels', 'not recorded')}), {ev.get('threads')} threads "
              f"(steps ran with {record.get('step_threads', ev.get('threads'))}), "
              + (getattr(task_of(record), "timing_description", None)
                 or f"{ev.get('runs')} timed runs after {ev.get('warmup')} warm-up runs; latency is the model "
                    f"call on real eval rows (tokenization excluded)"),
              f"- python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items())]
    if record.get("error"):
        lines += ["", "## Error", "", "```", record["error"], "```"]
    return "\n".join(lines) + "\n"
