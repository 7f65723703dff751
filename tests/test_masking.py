"""Property tests of the masking rules (METHOD §5): rates, 80/10/10, R-N exclusivity, ITM negatives."""

from __future__ import annotations

import math

import pytest
import torch

from muvla.pretraining.masking import (
    REGIONS,
    TEXT,
    mask_is,
    mask_regions,
    mask_rn,
    mask_rt,
    mask_tokens,
    phrase_targets,
    sample_itm_negatives,
)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 50


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within(observed: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    """Binomial tolerance: |observed - p| <= sigmas * sqrt(p(1-p)/n)."""
    return abs(observed - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n)


def sentence_batch(B: int, L: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (B, L), generator=gen(seed))
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[::3, -3:] = PAD  # some padding
    return ids


def test_mask_tokens_rate_80_10_10_and_specials() -> None:
    ids = sentence_batch(400, 50)
    maskable = torch.ones_like(ids, dtype=torch.bool)  # even "maskable" specials must stay untouched
    out, labels = mask_tokens(ids, maskable, 0.15, MASK, VOCAB, SPECIAL, gen(1))
    special = torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != -100
    assert not selected[special].any()
    assert torch.equal(out[special], ids[special])
    assert torch.equal(out[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    n_cand = int((~special).sum())
    assert within(selected.sum().item() / n_cand, 0.15, n_cand)
    n = int(selected.sum())
    to_mask = (out[selected] == MASK).float().mean().item()
    kept = (out[selected] == ids[selected]).float().mean().item()
    assert within(to_mask, 0.8, n)
    # kept = the 10% "unchanged" plus random draws that hit the same id (1/45 of the 10%)
    assert within(kept, 0.1 + 0.1 / (VOCAB - len(SPECIAL)), n)
    replaced = out[selected][(out[selected] != MASK)]
    assert not torch.isin(replaced, torch.tensor(SPECIAL)).any()


def test_mask_tokens_is_reproducible_and_respects_maskable() -> None:
    ids = sentence_batch(8, 20)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 5:9] = True
    a = mask_tokens(ids, maskable, 0.5, MASK, VOCAB, SPECIAL, gen(3))
    b = mask_tokens(ids, maskable, 0.5, MASK, VOCAB, SPECIAL, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (a[1][~maskable] != -100).any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_tokens(ids, maskable, 1.5, MASK, VOCAB, SPECIAL, gen())
    with pytest.raises(ValueError, match="maskable"):
        mask_tokens(ids, maskable[:, :3], 0.15, MASK, VOCAB, SPECIAL, gen())


def test_per_position_probability() -> None:
    ids = torch.randint(5, VOCAB, (2000, 4), generator=gen(0))
    prob = torch.tensor([0.0, 0.1, 0.5, 1.0]).expand(2000, 4)
    _, labels = mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), prob, MASK, VOCAB, SPECIAL, gen(1))
    rates = (labels != -100).float().mean(0)
    assert rates[0] == 0 and rates[3] == 1
    assert within(rates[1].item(), 0.1, 2000) and within(rates[2].item(), 0.5, 2000)


def test_ensure_one_masks_every_sample_with_candidates() -> None:
    ids = sentence_batch(50, 8)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[0] = False  # nothing maskable: stays unmasked
    _, labels = mask_tokens(ids, maskable, 0.01, MASK, VOCAB, SPECIAL, gen(0), ensure_one=True)
    per_row = (labels != -100).sum(1)
    assert per_row[0] == 0 and (per_row[1:] >= 1).all()
    feats = torch.randn(50, 6, 3)
    _, rm = mask_regions(feats, torch.ones(50, 6, dtype=torch.bool), 0.01, gen(0), ensure_one=True)
    assert (rm.sum(1) >= 1).all()


def test_mask_regions_zeroes_90_percent_and_keeps_input() -> None:
    feats = torch.randn(500, 20, 4, generator=gen(0)) + 1.0
    before = feats.clone()
    maskable = torch.ones(500, 20, dtype=torch.bool)
    maskable[:, -5:] = False
    masked_feats, rm = mask_regions(feats, maskable, 0.15, gen(1))
    assert torch.equal(feats, before)  # the original stays available as the MRFR target
    assert not rm[:, -5:].any()
    n = int(maskable.sum())
    assert within(rm.sum().item() / n, 0.15, n)
    zeroed = (masked_feats == 0).all(-1)
    assert not zeroed[~rm].any()
    assert within(zeroed[rm].float().mean().item(), 0.9, int(rm.sum()))
    assert torch.equal(masked_feats[rm & ~zeroed], feats[rm & ~zeroed])


def test_mask_rt_masks_tags_and_regions() -> None:
    tags = sentence_batch(200, 12)
    feats = torch.randn(200, 10, 4)
    out = mask_rt(tags, torch.ones_like(tags, dtype=torch.bool), feats, torch.ones(200, 10, dtype=torch.bool),
                  MASK, VOCAB, SPECIAL, gen(0))
    assert out.masked_modality is None
    assert (out.mlm_labels != -100).any() and out.region_masked.any()
    assert within(out.region_masked.float().mean().item(), 0.15, 2000)


def rn_batch(B: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    L, R = 16, 10
    ids = sentence_batch(B, L, seed)
    phrase_mask = torch.rand(B, L, generator=g) < 0.4
    phrase_mask[:, 0] = True  # claims [CLS] is in a phrase: must still never be masked
    sim = torch.rand(B, R, generator=g)
    has = torch.rand(B, R, generator=g) < 0.7
    return dict(input_ids=ids, phrase_token_mask=phrase_mask, region_features=torch.randn(B, R, 4, generator=g),
                region_sim=sim, region_has_phrase=has)


def test_rn_never_masks_non_phrase_tokens_or_unmatched_regions() -> None:
    b = rn_batch(300)
    out = mask_rn(**b, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, generator=gen(1), prob=0.5)
    text_masked = out.mlm_labels != -100
    assert text_masked.any() and out.region_masked.any()
    assert not text_masked[~b["phrase_token_mask"]].any()
    assert not text_masked[:, 0].any()
    changed = out.input_ids != b["input_ids"]
    assert not changed[~text_masked].any()
    assert not out.region_masked[~b["region_has_phrase"]].any()


def test_rn_masks_one_modality_per_sample() -> None:
    b = rn_batch(400)
    out = mask_rn(**b, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, generator=gen(2), prob=0.9,
                  ensure_one=True)
    text_any = (out.mlm_labels != -100).any(1)
    region_any = out.region_masked.any(1)
    assert not (text_any & region_any).any()
    assert torch.equal(text_any, out.masked_modality == TEXT)
    assert torch.equal(region_any, out.masked_modality == REGIONS)
    share_text = (out.masked_modality == TEXT).float().mean().item()
    assert within(share_text, 0.5, 400)  # fair coin when both modalities are maskable
    assert not torch.equal(out.region_features, b["region_features"])


def test_rn_region_rate_tracks_similarity() -> None:
    """No phrase tokens -> the region branch always; empirical rate per cs level ~ 0.15 * cs."""
    B, R = 4000, 4
    cs = torch.tensor([0.0, 0.2, 0.6, 1.0]).expand(B, R)
    ids = sentence_batch(B, 6)
    out = mask_rn(ids, torch.zeros_like(ids, dtype=torch.bool), torch.randn(B, R, 3), cs,
                  torch.ones(B, R, dtype=torch.bool), MASK, VOCAB, SPECIAL, gen(5))
    assert ((out.masked_modality == REGIONS) | (out.masked_modality == 0)).all()
    rates = out.region_masked.float().mean(0)
    assert rates[0] == 0
    for j, c in enumerate([0.2, 0.6, 1.0]):
        assert within(rates[j + 1].item(), 0.15 * c, B), (c, rates[j + 1].item())


def test_rn_text_rate_and_phrase_similarity_scaling() -> None:
    B, L = 3000, 6
    ids = torch.randint(5, VOCAB, (B, L), generator=gen(0))
    phrase = torch.ones(B, L, dtype=torch.bool)
    no_regions = dict(region_features=torch.zeros(B, 1, 3), region_sim=torch.zeros(B, 1),
                      region_has_phrase=torch.zeros(B, 1, dtype=torch.bool))
    out = mask_rn(ids, phrase, **no_regions, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                  generator=gen(1))
    assert (out.masked_modality == TEXT).all()
    assert within((out.mlm_labels != -100).float().mean().item(), 0.15, B * L)
    tok_sim = torch.full((B, L), 0.4)
    scaled = mask_rn(ids, phrase, **no_regions, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                     generator=gen(1), phrase_token_sim=tok_sim)
    assert within((scaled.mlm_labels != -100).float().mean().item(), 0.06, B * L)
    with pytest.raises(ValueError, match="region_sim"):
        mask_rn(ids, phrase, torch.zeros(B, 1, 3), torch.full((B, 1), 1.5), torch.ones(B, 1, dtype=torch.bool),
                MASK, VOCAB, SPECIAL, gen())


def test_mask_is_labels_positives_only() -> None:
    ids = sentence_batch(100, 10)
    attn = ids != PAD
    positive = torch.arange(100) % 2 == 0
    _, labels = mask_is(ids, attn, positive, MASK, VOCAB, SPECIAL, gen(0), prob=0.5)
    assert (labels[~positive] == -100).all()
    assert (labels[positive] != -100).any()
    assert not (labels[~attn] != -100).any()


def test_phrase_targets() -> None:
    ids = torch.tensor([[CLS, 10, 11, 12, 13, 14, SEP]])
    token_phrase = torch.tensor([[-1, 0, 0, -1, 1, 1, -1]])
    region_phrase = torch.tensor([[1, -1, 0, 1]])
    t = phrase_targets(ids, token_phrase, region_phrase, max_pieces=3)
    assert t.shape == (1, 4, 3)
    assert t[0, 0].tolist() == [13, 14, -100]
    assert t[0, 1].tolist() == [-100, -100, -100]
    assert t[0, 2].tolist() == [10, 11, -100]
    assert phrase_targets(ids, token_phrase, region_phrase, max_pieces=1)[0, 2].tolist() == [10]
    assert phrase_targets(ids, token_phrase, region_phrase, max_pieces=9).shape == (1, 4, 9)


def test_itm_negatives_never_the_positive_and_half_split() -> None:
    B = 1000
    positives = torch.randint(0, 20, (B,), generator=gen(0))
    is_neg, neg_ids = sample_itm_negatives(B, 20, gen(1), exclude=positives)
    assert within(is_neg.float().mean().item(), 0.5, B, sigmas=1.0)
    assert (neg_ids[is_neg] != positives[is_neg]).all()
    assert ((neg_ids[is_neg] >= 0) & (neg_ids[is_neg] < 20)).all()
    assert (neg_ids[~is_neg] == -1).all()
    # the top-K exclusion and a tiny pool: the only allowed sentence is id 3
    exclude = torch.tensor([[0, 1, 2], [2, 1, 0]])
    is_neg, neg_ids = sample_itm_negatives(2, 4, gen(2), exclude=exclude, neg_fraction=1.0)
    assert is_neg.all() and neg_ids.tolist() == [3, 3]
    with pytest.raises(ValueError, match="every sentence"):
        sample_itm_negatives(1, 2, gen(), exclude=torch.tensor([[0, 1]]), neg_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        sample_itm_negatives(4, 1, gen())


def test_itm_negatives_expected_half_for_single_samples() -> None:
    hits = sum(bool(sample_itm_negatives(1, 10, gen(s))[0][0]) for s in range(400))
    assert within(hits / 400, 0.5, 400)
