"""The report of ``qtool calibrate``: built as JSON, rendered as markdown, text and HTML.

* :mod:`~qtool.report.build`: the report.json document;
* :mod:`~qtool.report.markdown`: report.md, the terminal summary, number formats;
* :mod:`~qtool.report.html`: the self-contained report.html page.
"""

from qtool.report.build import build_report, to_json
from qtool.report.html import render_html
from qtool.report.markdown import evaluation_table, fmt_db, fmt_pct, summary_table, to_markdown

__all__ = [
    "build_report",
    "evaluation_table",
    "fmt_db",
    "fmt_pct",
    "render_html",
    "summary_table",
    "to_json",
    "to_markdown",
]
