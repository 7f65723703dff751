"""The experiment's paired statistics: per-image hits, the paired bootstrap, the verdict's wording."""

from __future__ import annotations

import numpy as np
import pytest

from muvla.experiment.results import claims_table, findings
from muvla.experiment.stats import Gap, ImageHits, paired_gap


def hits(i2t: list[int], t2i: list[int], text_to_image: list[int]) -> ImageHits:
    n = max(text_to_image) + 1
    return ImageHits(tuple(f"im{i}" for i in range(n)), np.array(i2t), np.array(t2i), np.array(text_to_image))


def test_image_hits_from_a_score_matrix_with_ties_by_hand() -> None:
    # 3 images, 2 captions each (caption j belongs to image j // 2); ties rank the lower index first
    scores = np.array([[0.1, 0.9, 0.9, 0.0, 0.0, 0.0],
                       [0.5, 0.5, 0.2, 0.2, 0.0, 0.0],
                       [0.0, 0.0, 0.3, 0.3, 0.3, 0.3]])
    h = ImageHits.from_scores(["a", "b", "c"], scores, np.array([0, 0, 1, 1, 2, 2]))
    # image a: best own caption 1 (0.9) ties caption 2 (0.9, higher index) -> rank 0
    # image b: own captions 2, 3 at 0.2, below 0.5 x2 -> rank 2
    # image c: own captions 4, 5 at 0.3 tie captions 2, 3 (lower index) -> rank 2
    assert h.i2t_rank.tolist() == [0, 2, 2]
    # caption 2 (image b): image a 0.9 > 0.2, image c 0.3 > 0.2 -> rank 2; caption 3: c 0.3 > 0.2 -> 1
    assert h.t2i_rank.tolist() == [1, 0, 2, 1, 0, 0]
    image_hits, text_hits, texts = h.per_image()
    assert image_hits.tolist() == [3, 2, 2] and text_hits.tolist() == [5, 4, 6] and texts.tolist() == [2, 2, 2]
    hand = (np.mean([3, 2, 2]) + np.mean([2, 3, 2, 2, 3, 3])) / 6  # hits over k = 1, 5, 10 per query
    assert h.mean_recall()[0] == pytest.approx(hand)


def test_mean_recall_weights_are_a_resample_of_the_images() -> None:
    h = hits([0, 7, 12], [0, 3, 11, 2, 0, 20], [0, 0, 1, 1, 2, 2])
    resample = ImageHits(("im0", "im0", "im2"), np.array([0, 0, 12]), np.array([0, 3, 0, 3, 0, 20]),
                         np.array([0, 0, 1, 1, 2, 2]))  # images 0, 0, 2 written out
    assert h.mean_recall(np.array([[2, 0, 1]]))[0] == pytest.approx(resample.mean_recall()[0])


def slow_paired_gap(a: dict[int, ImageHits], b: dict[int, ImageHits], n_boot: int, seed: int) -> np.ndarray:
    """The paired bootstrap written as loops (the same random draws as the vectorised one)."""
    seeds = sorted(a)
    n = a[seeds[0]].n_images
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    drawn = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    out = []
    for r in range(n_boot):
        gaps = []
        for i in drawn[r]:
            s = seeds[i]
            ids = np.repeat(np.arange(n), counts[r])
            gaps.append(_mr(a[s], ids) - _mr(b[s], ids))
        out.append(np.mean(gaps))
    return np.array(out)


def _mr(h: ImageHits, ids: np.ndarray) -> float:
    i2t = np.mean([sum(h.i2t_rank[i] < k for k in (1, 5, 10)) for i in ids])
    t2i = [sum(r < k for k in (1, 5, 10)) for i in ids for r in h.t2i_rank[h.text_to_image == i]]
    return (i2t + np.mean(t2i)) / 6


def test_paired_gap_equals_the_loop_and_pairs_seeds_and_images() -> None:
    rng = np.random.default_rng(3)
    t2i_map = np.repeat(np.arange(8), 2)
    a = {s: hits(rng.integers(0, 12, 8).tolist(), rng.integers(0, 12, 16).tolist(), t2i_map.tolist()) for s in (0, 1, 2)}
    b = {s: hits(rng.integers(0, 12, 8).tolist(), rng.integers(0, 12, 16).tolist(), t2i_map.tolist()) for s in (0, 1, 2)}
    gap = paired_gap("a", "b", a, b, n_boot=300, seed=5)
    boot = slow_paired_gap(a, b, 300, 5)
    assert (gap.low, gap.high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    assert gap.per_seed == pytest.approx([a[s].mean_recall()[0] - b[s].mean_recall()[0] for s in (0, 1, 2)])
    assert gap.gap == pytest.approx(np.mean(gap.per_seed))
    # a model against itself: every resample gives 0 (the pairing is exact)
    same = paired_gap("a", "a", a, a, n_boot=100)
    assert (same.gap, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_gap_refuses_other_images_and_no_shared_seed() -> None:
    a = {0: hits([0, 1], [0, 1], [0, 1])}
    other = {0: ImageHits(("x", "y"), np.array([0, 1]), np.array([0, 1]), np.array([0, 1]))}
    with pytest.raises(ValueError, match="other images"):
        paired_gap("a", "b", a, other)
    with pytest.raises(ValueError, match="share no seed"):
        paired_gap("a", "b", a, {1: a[0]})


@pytest.mark.parametrize(("low", "high", "verdict", "words"), [
    (0.01, 0.05, "holds", "muvla beats joint_unaligned"),
    (-0.05, -0.01, "reversed", "joint_unaligned beats muvla"),
    (-0.01, 0.05, "not distinguishable at this size", "not distinguishable at this size"),
])
def test_findings_are_worded_from_the_interval(low: float, high: float, verdict: str, words: str) -> None:
    gap = Gap("muvla", "joint_unaligned", (low + high) / 2, low, high, (0.02, 0.03), (0, 1), 75, 2000)
    assert gap.verdict == verdict
    row = {"claim": "retrieved pairs beat random pairs", "kind": "zero_shot", "split": "test", "a": gap.a, "b": gap.b,
           "gap": gap.gap, "low": low, "high": high, "per_seed": list(gap.per_seed), "seeds": [0, 1], "n_images": 75,
           "verdict": gap.verdict}
    (sentence,) = findings([row], "test")
    assert words in sentence and f"[{100 * low:+.1f}, {100 * high:+.1f}]" in sentence
    assert verdict in claims_table([row], "test") and findings([row], "dev") == []
