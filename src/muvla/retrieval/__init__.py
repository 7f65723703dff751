"""Retrieval stage: top-K unpaired sentences per image from its region tags (METHOD.md section 2)."""

from muvla.retrieval.queries import (
    QUERY_MODES,
    TaggedImage,
    counted_query,
    make_query,
    official_query,
    pluralise,
    salient_query,
)
from muvla.retrieval.rerank import RankingConfig, rank_images, rank_sentences, read_tagged_images
from muvla.retrieval.stage import DEFAULT_K, RetrievalConfig, RetrievalSettings, run_retrieval

__all__ = ["DEFAULT_K", "QUERY_MODES", "RankingConfig", "RetrievalConfig", "RetrievalSettings", "TaggedImage",
           "counted_query", "make_query", "official_query", "pluralise", "rank_images", "rank_sentences",
           "read_tagged_images", "run_retrieval", "salient_query"]
