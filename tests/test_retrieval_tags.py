"""Query tags of confident regions only (``min_tag_score``), for weak detectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from muvla.corpus.layout import RegionsOutput
from muvla.corpus.region_store import ImageRegions
from muvla.corpus.synthetic import write_region_store
from muvla.retrieval.rerank import read_tagged_images


def _store(root: Path) -> RegionsOutput:
    images = [ImageRegions(image_id=image_id, file=f"{image_id}.jpg", width=10, height=10,
                           boxes=np.tile(np.array([0, 0, 5, 5], np.float32), (3, 1)), tags=tags,
                           scores=np.array(scores, np.float32), class_ids=np.zeros(3, np.int32),
                           features=np.zeros((3, 4), np.float16))
              for image_id, tags, scores in (("a", ["dog", "puck", "frisbee"], [0.9, 0.1, 0.6]),
                                             ("b", ["bubble", "jellyfish", ""], [0.2, 0.3, 0.0]))]
    return RegionsOutput(write_region_store(root, images))


def test_low_scored_tags_leave_the_query_but_the_best_tag_stays(tmp_path: Path) -> None:
    root = _store(tmp_path / "regions")
    images = read_tagged_images(root.root, 0.5)
    assert [im.image_id for im in images] == ["a", "b"]
    assert [im.tags for im in images] == [["dog", "frisbee"], ["jellyfish"]]  # b: nothing passes, its best tag stays


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_no_threshold_is_the_reference_recipe(tmp_path: Path, threshold: float) -> None:
    root = _store(tmp_path / "regions")
    ids, tags = root.image_tags()
    images = read_tagged_images(root.root, threshold)
    assert [im.image_id for im in images] == ids and [im.tags for im in images] == [[t for t in ts if t] for ts in tags]
