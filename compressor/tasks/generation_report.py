"""The text-generation task's section of the run report: instruction accuracy, time to first token, decode
speed and peak memory per artifact."""

from __future__ import annotations

from typing import Any

from compressor.report.markdown import fmt_value


def perplexity_sample(measured: dict[str, Any]) -> str:
    """What text a perplexity figure scored, in words: its first tokens, or windows spread over the file."""
    if measured.get("perplexity_windows"):
        return (f"{measured['perplexity_windows']} windows of {measured['perplexity_window']} tokens spread over its "
                f"{measured['perplexity_file_tokens']:,} ({measured['perplexity_tokens']:,} tokens)")
    return f"first {measured['perplexity_tokens']:,} tokens in windows of {measured['perplexity_window']}"


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
             (f"Perplexity: {ppl['perplexity_file']}, {perplexity_sample(ppl)} (lower is better). " if ppl else "")
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
