"""Retrieval stage: top-K unpaired sentences per image from its region tags (METHOD.md section 2)."""

from muvla.retrieval.queries import QUERY_MODES, counted_query, make_query, official_query, pluralise
from muvla.retrieval.stage import DEFAULT_K, RetrievalConfig, RetrievalSettings, run_retrieval

__all__ = ["DEFAULT_K", "QUERY_MODES", "RetrievalConfig", "RetrievalSettings", "counted_query", "make_query",
           "official_query", "pluralise", "run_retrieval"]
