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


def generation_markdown(record: dict[str, Any]) -> list[str]:
    """For generators: instruction accuracy, time to first token, decode speed and peak memory per artifact."""
    arts = [a for a in record["artifacts"] if (a.get("latency") or {}).get("decode_tokens_per_s")
            or a.get("accuracy_rows")]
    if not arts:
        return []
    base = next((a["latency"]["decode_tokens_per_s"] for a in arts if (a.get("latency") or {}).get("decode_tokens_per_s")),
                None)
    lat = next((a["latency"] for a in arts if a.get("latency")), {})
    ppl = next((a for a in arts if a.get("perplexity_file")), None)
    lines = ["", "## Generation", "",
             (f"Perplexity: {ppl['perplexity_file']}, first {ppl['perplexity_tokens']:,} tokens in windows of "
              f"{ppl['perplexity_window']} (lower is better). " if ppl else "")
             + (f"Accuracy: greedy answers to {arts[-1].get('accuracy_rows')} eval rows, exact match. "
                if arts[-1].get("accuracy_rows") else "")
             + (f"Speed: batch 1, a {lat.get('prompt_tokens')}-token prompt, {lat.get('new_tokens')} new tokens, "
                "best of the timed runs, each model in a fresh process (peak RSS is that process's own)."
                if lat else ""), "",
             "| # | artifact | accuracy | TTFT ms | decode tokens/s | ×decode | peak RSS MB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for a in arts:
        la = a.get("latency") or {}
        speed = la.get("decode_tokens_per_s")
        lines.append(f"| {a['index']} | {a['name']} | {fmt_value(a.get('accuracy'), '.4f')} | "
                     f"{fmt_value(la.get('ttft_ms'), '.1f')} | {fmt_value(speed, '.1f')} | "
                     f"{fmt_value(speed / base if speed and base else None, '.2f', '×')} | "
                     f"{fmt_value(la.get('peak_rss_mb'), '.0f')} |")
    return lines


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
    lines += generation_markdown(record)
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
        notes_ = ", ".join(f"{k}={fmt_note(v)}" for k, v in s["notes"].items() if k != "search")
        lines.append(f"| {s['index']}: {s['uses']} | {s['seconds']:.1f} | {'yes' if s['cached'] else 'no'} | {notes_} |")
    for s in record["steps"]:
        if isinstance(s["notes"].get("search"), dict):
            lines += ["", *search_markdown(s)]
    lines += ["", "## Reproducibility", "",
              f"- recipe: `{record['recipe_path']}` (sha256 `{record['recipe_hash'][:16]}…`)",
              f"- data sha256: `{(record['data_hash'] or '–')[:16]}…` · seed: {record['seed']}",
              f"- measured on: {env['cpu']} ({env['cpu_count']} CPUs, int8 kernels "
              f"{env.get('int8_kernels', 'not recorded')}), {ev.get('threads')} threads "
              f"(steps ran with {record.get('step_threads', ev.get('threads'))}), "
              + ("generation timed in a fresh process per model (see Generation)"
                 if any((a.get("latency") or {}).get("decode_tokens_per_s") for a in record["artifacts"])
                 else f"{ev.get('runs')} timed runs after {ev.get('warmup')} warm-up runs; latency is the model "
                      f"call on real eval rows (tokenization excluded)"),
              f"- python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items())]
    if record.get("error"):
        lines += ["", "## Error", "", "```", record["error"], "```"]
    return "\n".join(lines) + "\n"


def search_markdown(step: dict[str, Any]) -> list[str]:
    """A step's settings search (quantize-onnx mode: auto): every candidate, the one chosen and why."""
    found = step["notes"]["search"]
    metric = found.get("metric", "metric")
    cpu = found.get("cpu") or {}
    lines = [f"## Settings search: steps[{step['index']}] ({step['uses']})", "",
             f"Measured on {cpu.get('model', 'this CPU')} (int8 kernels: {cpu.get('int8_kernels', '?')}), on "
             f"{found['tuning_rows']} tuning rows from {found['tuning_source']}; the eval rows were not used. "
             f"Input {metric} on them: {found['reference']:.4f}; budget: a drop of at most {found['budget']:.4f}. "
             f"Search time: {found['seconds']:.1f} s.", "",
             f"| candidate | weights | per channel | reduce_range | left in float | {metric} | Δ | size (MB) "
             f"| p50 ms (b1) | within budget |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for c in found["candidates"]:
        chosen = " **(chosen)**" if c["name"] == found["chosen"] else ""
        lines.append(f"| {c['name']}{chosen} | {c['weight_type']} | {'yes' if c['per_channel'] else 'no'} | "
                     f"{'yes' if c['reduce_range'] else 'no'} | {len(c['excluded']) or '–'} | {c['metric']:.4f} | "
                     f"{c['change']:+.4f} | {c['size_bytes'] / 1e6:.2f} | {fmt_value(c.get('p50_ms'), '.2f')} | "
                     f"{'yes' if c['within_budget'] else 'no'} |")
    lines += ["", f"Chosen: **{found['chosen']}** — {found['reason']}."]
    excluded = next((c["excluded"] for c in found["candidates"] if c["name"] == found["chosen"]), [])
    if excluded:
        lines.append(f"Left in float: {', '.join(f'`{n}`' for n in excluded)}.")
    if found.get("sensitivity"):
        top = list(found["sensitivity"].items())[:8]
        lines.append("Most sensitive nodes (output noise-to-signal per channel, each node quantized alone): "
                     + ", ".join(f"`{n}` {v:.3g}" for n, v in top) + ".")
    return lines

