"""A run's reports: rows and report.md (markdown), report.html (html), the files of a run (files)."""
