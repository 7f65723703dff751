"""Text stage: clean text-only corpora into ``sentences.parquet`` (format: ``muvla.corpus.layout``)."""

from muvla.text.readers import detect_format
from muvla.text.stage import TextConfig, TextSettings, run_text

__all__ = ["TextConfig", "TextSettings", "detect_format", "run_text"]
