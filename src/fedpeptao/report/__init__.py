"""Readable results: a Markdown report with PNG plots for one or more run directories."""

from fedpeptao.report.runs import ReportError, RunData, read_run, read_runs
from fedpeptao.report.writer import default_out_dir, write_report

__all__ = ["ReportError", "RunData", "default_out_dir", "read_run", "read_runs", "write_report"]
