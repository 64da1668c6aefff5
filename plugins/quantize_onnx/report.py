"""The report section of quantize-onnx's settings search (mode: auto): every candidate, the one chosen and why."""

from __future__ import annotations

from typing import Any

from compressor.report.markdown import fmt_value


def search_markdown(step: dict[str, Any]) -> list[str]:
    """The settings search of one quantize-onnx step (its record.json entry) as Markdown lines."""
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

