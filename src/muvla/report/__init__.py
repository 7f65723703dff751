"""Self-contained HTML report of a corpus run (images, boxes, retrieved sentences, matched phrases)."""

from muvla.report.html import write_report
from muvla.report.readers import ReportError

__all__ = ["ReportError", "write_report"]
