"""A run's report files: report.json and report.md (compressor.report.markdown) and report.html (compressor.report.html)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.run.cache import write_json_atomic, write_text_atomic
from compressor.report.markdown import render_markdown, report_rows
from compressor.report.html import write_html_report


def write_reports(record: dict[str, Any], run_dir: Path) -> None:
    """Write report.json, report.md and report.html into the run directory."""
    rows = report_rows(record)
    write_json_atomic(Path(run_dir) / "report.json", {"name": record["name"], "status": record["status"],
                                                      "guard": record.get("guard"), "rows": rows})
    write_text_atomic(Path(run_dir) / "report.md", render_markdown(record, rows))
    write_html_report([record], run_dir)
