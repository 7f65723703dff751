"""Phrases stage: noun phrases of retrieved sentences and region-phrase matching (METHOD.md section 3)."""

from muvla.phrases.stage import PhrasesConfig, extract_phrases, match_regions, run_phrases, token_span

__all__ = ["PhrasesConfig", "extract_phrases", "match_regions", "run_phrases", "token_span"]
