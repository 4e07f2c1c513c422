"""The study report: plots, a self-contained HTML page, CSV and JSON exports."""

from privtune.report.export import write_csv, write_frontier, write_json
from privtune.report.html import write_report

__all__ = ["write_csv", "write_frontier", "write_json", "write_report"]
