"""Region-tag samples of a pre-training corpus, for :meth:`muvla.model.Model.init_region_projection`.

The projection is fitted on the corpus's own regions and detector tags (image-side data only, the
same pairs R-T trains on), before the first step. Images are taken evenly spaced over the corpus so
that a huge corpus is sampled instead of read whole.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from muvla.model import Model
from muvla.pretraining.data import PretrainCorpus

logger = logging.getLogger(__name__)

MAX_FIT_REGIONS = 20_000  # enough for a 2048-d ridge fit; bounds memory (~160 MB of float32 features)


def region_tag_sample(corpus: PretrainCorpus, max_regions: int = MAX_FIT_REGIONS
                      ) -> tuple[torch.Tensor, list[list[int]]]:
    """Features [N, D] float32 and the WordPiece ids of each region's tag, N <= max_regions.

    Uses the regions training sees (an image's first ``corpus.num_regions[i]``); regions with an empty
    tag or a tag without WordPieces are left out.
    """
    n_images = len(corpus)
    mean_regions = max(1.0, sum(corpus.num_regions) / max(1, n_images))
    stride = max(1, int(n_images * mean_regions // max_regions))
    pieces: dict[str, list[int]] = {}
    feats: list[np.ndarray] = []
    tags: list[list[int]] = []
    total = 0
    for i in range(0, n_images, stride):
        reg = corpus.regions(i)
        n = corpus.num_regions[i]
        keep = []
        for r, tag in enumerate(reg.tags[:n]):
            if tag and tag not in pieces:
                pieces[tag] = list(corpus.tokenizer(tag, add_special_tokens=False)["input_ids"])
            if tag and pieces[tag]:
                keep.append(r)
                tags.append(pieces[tag])
        if keep:
            feats.append(np.asarray(reg.features[keep], dtype=np.float32))
            total += len(keep)
        if total >= max_regions:
            break
    if not feats:
        return torch.zeros(0, corpus.feature_dim), []
    features = torch.from_numpy(np.concatenate(feats)[:max_regions])
    return features, tags[:max_regions]


def ground_region_projection(model: Model, corpus: PretrainCorpus, max_regions: int = MAX_FIT_REGIONS) -> int:
    """Fit the model's region projection to the corpus's region tags; returns the regions used (0 = no
    tags in the corpus, e.g. BUTD features: the random projection is kept and a warning logged)."""
    features, tags = region_tag_sample(corpus, max_regions)
    if not tags:
        logger.warning("no region tags in the corpus: the region projection keeps its random init")
        return 0
    model.init_region_projection(features, tags)
    logger.info("region projection fitted to the tags of %d regions (%d distinct tags)", len(tags),
                len({tuple(t) for t in tags}))
    return len(tags)
