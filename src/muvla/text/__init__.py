"""Text stage: clean text-only corpora into ``sentences.parquet`` (METHOD.md section 2)."""

from muvla.text.readers import detect_format
from muvla.text.stage import TextConfig, read_sentences, run_text

__all__ = ["TextConfig", "detect_format", "read_sentences", "run_text"]
