"""report.html: one self-contained page (images embedded, nothing fetched) per run or per set of
runs — the artifact table, accuracy against size and against latency with the Pareto front
marked, what each step added or removed, the guard's verdict and how to reproduce the run. The
plots are also written as PNG files beside it."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from compressor.run.cache import write_text_atomic
from compressor.report.markdown import fmt_value, report_rows, step_sections, task_sections


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower or equal cost and higher or equal quality,
    better in at least one (cost is size or latency, quality is the metric turned so that higher is
    better: see `quality`)."""
    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = any((c <= cost and q >= quality) and (c < cost or q > quality)
                        for j, (c, q) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def quality(point: dict[str, Any]) -> float:
    """A point's metric, negated where lower is better (perplexity), so that higher is always better."""
    return point["metric"] if point.get("higher_is_better", True) else -point["metric"]


def collect_points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured artifacts as labelled points: every step of a single run; over several runs,
    each distinct artifact once (variants of a sweep share their input and often a prefix); for
    the variants of a sweep, their input and their final artifacts."""
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    several = len(runs) > 1
    for record in runs:
        run = record.get("variant") or record["name"]
        last = len(record["artifacts"]) - 1
        rows = report_rows(record)
        # the reference: the first artifact with a metric (a bare encoder has none until fine-tuned)
        first = next((r["index"] for r in rows if r["metric"] is not None), 0)
        for row, artifact in zip(rows, record["artifacts"]):
            if row["metric"] is None or artifact.get("hash") in seen:
                continue
            if record.get("matrix") and several and first < row["index"] < last:
                continue
            seen.add(artifact.get("hash", f"{run}/{row['index']}"))
            if not several:
                label = row["artifact"]
            elif row["index"] == first:
                label = f"reference ({row['artifact']})"
            elif record.get("matrix"):
                label = run
            else:
                label = f"{run}: {row['artifact']}"
            points.append({"label": label, "run": "reference" if several and row["index"] == first else run,
                           "index": row["index"],
                           "metric": row["metric"], "metric_name": row["metric_name"], "size_mb": row["size_mb"],
                           "higher_is_better": row["higher_is_better"],
                           "p50_ms": row["p50_ms"], "final": row["index"] == last})
    return points


def _scatter(points: list[dict[str, Any]], x_key: str, x_label: str, path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [p for p in points if p.get(x_key) is not None]
    if not usable:
        return None
    xy = [(p[x_key], p["metric"]) for p in usable]
    front = pareto_front([(p[x_key], quality(p)) for p in usable])
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    runs = sorted({p["run"] for p in usable})
    colours = plt.get_cmap("tab10")
    for k, run in enumerate(runs):
        mine = [i for i, p in enumerate(usable) if p["run"] == run]
        ax.scatter([xy[i][0] for i in mine], [xy[i][1] for i in mine], s=46, color=colours(k % 10),
                   label=run if len(runs) > 1 else None, zorder=3, edgecolor="white", linewidth=0.8)
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "--", color="#444", linewidth=1.2, zorder=2,
            label="Pareto front")
    ax.scatter([xy[i][0] for i in front], [xy[i][1] for i in front], s=140, facecolor="none", edgecolor="#d62728",
               linewidth=1.6, zorder=4)
    xs, ys = [x for x, _ in xy], [y for _, y in xy]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    for i, p in enumerate(usable):
        # stack the labels of points that sit close together instead of printing them over each other
        near = sum(1 for j in range(i) if abs(xs[j] - xs[i]) < 0.06 * span_x and abs(ys[j] - ys[i]) < 0.06 * span_y)
        ax.annotate(p["label"], xy[i], textcoords="offset points", xytext=(6, 5 + 10 * near), fontsize=7.5,
                    color="#222")
    if min(xs) > 0 and max(xs) / min(xs) > 4:
        ax.set_xscale("log")  # a 10× smaller model and its baseline on one readable axis
        x_label += " (log scale)"
    ax.set_xlabel(x_label)
    ax.set_ylabel(usable[0]["metric_name"] or "metric")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _attribution(record: dict[str, Any], path: Path) -> Path | None:
    """Bars: each step's change in size (MB) and in the metric (points), against the artifact before it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report_rows(record)
    steps, d_size, d_metric = [], [], []
    for before, after in zip(rows, rows[1:]):
        steps.append(f"{after['index']}: {after['artifact']}")
        d_size.append(after["size_mb"] - before["size_mb"])
        both = before["metric"] is not None and after["metric"] is not None
        d_metric.append(100 * (after["metric"] - before["metric"]) if both else 0.0)
    if not steps:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 0.45 * len(steps) + 1.8), dpi=110, sharey=True)
    ys = list(range(len(steps)))[::-1]
    left.barh(ys, d_size, color=["#2ca02c" if v <= 0 else "#d62728" for v in d_size])
    left.set_yticks(ys, steps, fontsize=8)
    left.set_xlabel("size change (MB)")
    better = [v if r["higher_is_better"] else -v for v, r in zip(d_metric, rows[1:])]
    right.barh(ys, d_metric, color=["#2ca02c" if v >= 0 else "#d62728" for v in better])
    right.set_xlabel(f"{rows[-1]['metric_name'] or 'metric'} change (points)")
    for ax in (left, right):
        ax.axvline(0, color="#444", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("What each step added or removed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return f"<p class='muted'>{html.escape(alt)}: nothing measured to plot.</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return html.escape(fmt_value(value, spec, suffix))


def _table(record: dict[str, Any], front: set[int]) -> str:
    rows = report_rows(record)
    metric = next((r["metric_name"] for r in rows if r["metric_name"]), "metric")
    crossed = (record.get("guard") or {}).get("crossed_at")
    head = ("<tr><th>#</th><th>artifact</th><th>format</th><th>{m}</th><th>Δ {m}</th><th>size MB</th>"
            "<th>×smaller</th><th>parameters</th><th>p50 ms</th><th>p90 ms</th><th>×faster</th>"
            "<th>throughput/s</th></tr>").format(m=html.escape(metric))
    body = []
    for r in rows:
        classes = []
        if r["index"] in front:
            classes.append("front")
        if crossed is not None and r["index"] == crossed:
            classes.append("crossed")
        body.append(
            f"<tr class='{' '.join(classes)}'><td>{r['index']}</td><td>{html.escape(r['artifact'])}</td>"
            f"<td>{r['format']}</td><td>{_fmt(r['metric'], '.4f')}</td><td>{_fmt(r['metric_change'], '+.4f')}</td>"
            f"<td>{_fmt(r['size_mb'], '.2f')}</td><td>{_fmt(r['x_smaller'], '.2f', '×')}</td>"
            f"<td>{_fmt(r['parameters'], ',')}</td><td>{_fmt(r['p50_ms'], '.2f')}</td>"
            f"<td>{_fmt(r['p90_ms'], '.2f')}</td><td>{_fmt(r['x_faster'], '.2f', '×')}</td>"
            f"<td>{_fmt(r['throughput'], '.1f')}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def markdown_html(lines: list[str]) -> str:
    """A report section that a task or step wrote in Markdown (headings, paragraphs, pipe tables), rendered by
    markdown-it-py (CommonMark with tables; raw HTML escaped), its headings one level down to sit under the
    run's own heading."""
    from markdown_it import MarkdownIt

    text = "\n".join("#" + line if line.startswith("#") else line for line in lines)
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text) if text.strip() else ""


def _guard(record: dict[str, Any]) -> str:
    guard = record.get("guard")
    if not guard:
        return "<p class='muted'>No guard was evaluated (the run did not finish).</p>"
    if not guard["checks"] and not guard["failures"]:
        return "<p class='muted'>No budget set.</p>"
    verdict = "<span class='ok'>passed</span>" if guard["passed"] else "<span class='bad'>FAILED</span>"
    items = []
    for c in guard["checks"]:
        mark = "ok" if c["passed"] else "bad"
        items.append(f"<li class='{mark}'>{html.escape(c['check'])}: {c['value']:.4f} "
                     f"(allowed {c['allowed']:.4f}{', drop ' + format(c['drop'], '+.4f') if 'drop' in c else ''})</li>")
    items += [f"<li class='bad'>{html.escape(f)}</li>" for f in guard.get("unmeasured", [])]
    crossed = guard.get("crossed_at")
    where = (f"<p>The budget was first crossed at artifact #{crossed} "
             f"({html.escape(record['artifacts'][crossed]['name'])}).</p>") if crossed is not None else ""
    return f"<p>Guard: {verdict}</p><ul>{''.join(items)}</ul>{where}"


def _repro(record: dict[str, Any]) -> str:
    env = record["environment"]
    ev = record.get("evaluation", {})
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    steps = "".join(f"<tr><td>{s['index']}: {html.escape(s['uses'])}</td><td>{s['seconds']:.1f}</td>"
                    f"<td>{'yes' if s['cached'] else 'no'}</td><td>{'yes' if s['deterministic'] else 'no'}</td>"
                    f"<td><code>{s['output_hash'][:16]}</code></td></tr>" for s in record["steps"])
    return (f"<ul><li>recipe <code>{html.escape(record['recipe_path'])}</code>, sha256 "
            f"<code>{record['recipe_hash'][:16]}…</code>{' · variant ' + html.escape(record['variant']) if record.get('variant') else ''}</li>"
            f"<li>data sha256 <code>{(record.get('data_hash') or '–')[:16]}…</code> · seed {record['seed']}</li>"
            f"<li>measured on {html.escape(env['cpu'])} ({env['cpu_count']} CPUs, int8 kernels "
            f"{html.escape(str(env.get('int8_kernels', 'not recorded')))}), {ev.get('threads')} threads "
            f"(steps ran with {record.get('step_threads', ev.get('threads'))}), "
            f"{ev.get('runs')} timed runs after {ev.get('warmup')} warm-up runs</li>"
            f"<li>compressor {html.escape(record['compressor'])}, python {env['python']}; {html.escape(libs)}</li></ul>"
            f"<table><tr><th>step</th><th>seconds</th><th>cached</th><th>deterministic</th><th>output sha256</th></tr>"
            f"{steps}</table>")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d1d1f;padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.88rem;margin:.6rem 0}
th,td{border-bottom:1px solid #e5e5e5;padding:.3rem .6rem;text-align:right}th{background:#f6f6f6}
td:nth-child(2),th:nth-child(2){text-align:left}
tr.front td{background:#fff6e0}tr.crossed td{background:#fde2e2}tr.selected td{font-weight:600}
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}.muted{color:#777}
img{max-width:100%;border:1px solid #eee;border-radius:6px;margin:.4rem 0}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#f6f8fa;border-radius:8px;padding:.6rem 1rem}
.card b{display:block;font-size:1.3rem}
"""


def _cards(record: dict[str, Any]) -> str:
    rows = report_rows(record)
    last = rows[-1]
    cards = [("status", record["status"]), ("final artifact", last["artifact"]),
             (last["metric_name"] or "metric", _fmt(last["metric"], ".4f")),
             ("Δ " + (last["metric_name"] or "metric"), _fmt(last["metric_change"], "+.4f")),
             ("size", _fmt(last["size_mb"], ".2f", " MB")), ("smaller", _fmt(last["x_smaller"], ".2f", "×")),
             ("faster (b1)", _fmt(last["x_faster"], ".2f", "×"))]
    return "<div class='cards'>" + "".join(f"<div class='card'>{html.escape(k)}<b>{v}</b></div>"
                                           for k, v in cards) + "</div>"


def write_html_report(runs: list[dict[str, Any]], out_dir: Path, title: str | None = None,
                      selected: str | None = None) -> Path:
    """Write report.html and its PNG plots into out_dir for one run or several (one Pareto front)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = collect_points(runs)
    # the task's metric names the plots (accuracy, f1, perplexity); the file names stay fixed
    what = next((p["metric_name"] for p in points if p["metric_name"]), "metric").capitalize()
    size_png = _scatter(points, "size_mb", "size on disk (MB)", out_dir / "accuracy_vs_size.png",
                        f"{what} against size (Pareto front circled)")
    lat_png = _scatter(points, "p50_ms", "p50 latency at batch 1 (ms)", out_dir / "accuracy_vs_latency.png",
                       f"{what} against latency (Pareto front circled)")
    size_front = [points[i] for i in pareto_front([(p["size_mb"], quality(p)) for p in points])]
    title = title or (runs[0]["name"] if len(runs) == 1 else f"{len(runs)} runs")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if len(runs) == 1:
        parts.append(_cards(runs[0]))
    else:
        parts.append(_overview(runs, selected))
    parts += [f"<h2>{what} against size</h2>", _img(size_png, f"{what.lower()} against size"),
              f"<h2>{what} against latency</h2>", _img(lat_png, f"{what.lower()} against latency")]
    for k, record in enumerate(runs):
        name = record.get("variant") or record["name"]
        attribution = _attribution(record, out_dir / (f"steps_{k}.png" if len(runs) > 1 else "steps.png"))
        mine = {p["index"] for p in size_front if p["run"] == name}
        heading = f"<h2>{html.escape(name)}</h2>" if len(runs) > 1 else "<h2>Artifacts</h2>"
        parts += [heading, _table(record, mine), markdown_html(task_sections(record)), "<h3>Step attribution</h3>",
                  _img(attribution, "step attribution"), markdown_html(step_sections(record)), "<h3>Guard</h3>",
                  _guard(record), "<h3>Reproducibility</h3>", _repro(record)]
        if record.get("error"):
            parts.append(f"<h3>Error</h3><pre>{html.escape(record['error'])}</pre>")
    parts.append("<p class='muted'>Rows on the accuracy-vs-size Pareto front are shaded; "
                 "the artifact where a guard budget was first crossed is red.</p></body></html>")
    path = out_dir / "report.html"
    write_text_atomic(path, "".join(parts))
    return path


def _overview(runs: list[dict[str, Any]], selected: str | None) -> str:
    rows = []
    for record in runs:
        last = report_rows(record)[-1]
        name = record.get("variant") or record["name"]
        guard = record.get("guard") or {}
        passed = "<span class='ok'>pass</span>" if guard.get("passed") else "<span class='bad'>fail</span>"
        cls = " class='selected'" if name == selected else ""
        rows.append(f"<tr{cls}><td>{'★ ' if name == selected else ''}</td><td>{html.escape(name)}</td>"
                    f"<td>{_fmt(last['metric'], '.4f')}</td><td>{_fmt(last['metric_change'], '+.4f')}</td>"
                    f"<td>{_fmt(last['size_mb'], '.2f')}</td><td>{_fmt(last['x_smaller'], '.2f', '×')}</td>"
                    f"<td>{_fmt(last['p50_ms'], '.2f')}</td><td>{passed}</td><td>{html.escape(record['status'])}</td></tr>")
    note = f"<p>Selected: <b>{html.escape(selected)}</b></p>" if selected else ""
    return (note + "<table><tr><th></th><th>variant / run</th><th>metric</th><th>Δ</th><th>size MB</th>"
            "<th>×smaller</th><th>p50 ms</th><th>guard</th><th>status</th></tr>" + "".join(rows) + "</table>")
