"""Retrieval stage: top-K unpaired sentences per image from its region tags (METHOD.md section 2)."""

from muvla.retrieval.queries import QUERY_MODES, counted_query, make_query, official_query, pluralise
from muvla.retrieval.stage import RetrievalConfig, read_region_tags, run_retrieval

__all__ = ["QUERY_MODES", "RetrievalConfig", "counted_query", "make_query", "official_query", "pluralise",
           "read_region_tags", "run_retrieval"]
