"""Masking rules of the three pre-training granularities (METHOD §5), as pure tensor functions.

Every random draw goes through the caller's ``torch.Generator``, so a (seed, batch) pair always
gives the same masks regardless of workers or devices. Draws are made on the generator's device
and moved to the inputs' device.

Conventions: a masked token is [MASK] 80% / a random non-special token 10% / unchanged 10% and gets
its original id as label (-100 elsewhere); a masked region has its feature zeroed with probability
0.9 and is flagged in ``region_masked`` (the caller keeps the ORIGINAL features for MRFR).

Minimum-one rule: by default nothing forces a masked item in a sample, so every masking rate is
exactly the stated probability (what the property tests check). ``ensure_one=True`` additionally
masks one candidate (drawn in proportion to its probability) in a sample where the draw picked
none; this raises the effective rate for short inputs, so it is off by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TEXT, REGIONS = 1, 2  # values of MaskingOutput.masked_modality (0 = nothing maskable)


@dataclass
class MaskingOutput:
    """One masked batch.

    input_ids:       [B, L] with masked tokens replaced (80/10/10).
    mlm_labels:      [B, L] original id at masked tokens, -100 elsewhere.
    region_features: [B, R, D] features with masked regions zeroed (90%); a new tensor.
    region_masked:   [B, R] bool, regions to predict (MRC / MRFR / p-MRTC targets).
    masked_modality: [B] long, R-N only: 1 = text, 2 = regions, 0 = nothing maskable; None otherwise.
    """

    input_ids: torch.Tensor
    mlm_labels: torch.Tensor
    region_features: torch.Tensor
    region_masked: torch.Tensor
    masked_modality: torch.Tensor | None = None


def _rand(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def _prob_tensor(prob: float | torch.Tensor, shape: torch.Size, device: torch.device, name: str) -> torch.Tensor:
    p = torch.as_tensor(prob, dtype=torch.float32, device=device)
    if p.dim() and tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must be a scalar or have shape {tuple(shape)}, got {tuple(p.shape)}")
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must lie in [0, 1]")
    return p.expand(shape)


def _select(candidates: torch.Tensor, prob: torch.Tensor, generator: torch.Generator,
            ensure_one: bool) -> torch.Tensor:
    """Bernoulli(prob) on the candidates; optionally force one pick in rows that got none."""
    selected = candidates & (_rand(candidates.shape, generator, candidates.device) < prob)
    if ensure_one:
        weights = (candidates & (prob > 0)).float() * prob
        empty = (~selected.any(dim=1)) & (weights.sum(dim=1) > 0)
        if empty.any():
            rows = empty.nonzero(as_tuple=False)[:, 0]
            picks = torch.multinomial(weights[rows].to(generator.device), 1, generator=generator)
            selected[rows, picks[:, 0].to(selected.device)] = True
    return selected


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, prob: float | torch.Tensor,
                mask_token_id: int, vocab_size: int, special_ids: Sequence[int],
                generator: torch.Generator, ensure_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of the ``maskable`` [B, L] tokens with probability ``prob`` (scalar or [B, L]).

    Special tokens ([CLS], [SEP], [PAD], [MASK], ...) are never masked, whatever ``maskable`` says,
    and are never drawn as the 10% random replacement. Returns (masked input_ids, labels).
    """
    if maskable.shape != input_ids.shape:
        raise ValueError(f"maskable {tuple(maskable.shape)} must match input_ids {tuple(input_ids.shape)}")
    device = input_ids.device
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=device)
    if mask_token_id not in set(int(s) for s in special_ids):
        special = torch.cat([special, torch.tensor([mask_token_id], dtype=input_ids.dtype, device=device)])
    candidates = maskable.bool() & ~torch.isin(input_ids, special)
    p = _prob_tensor(prob, input_ids.shape, device, "prob")
    selected = _select(candidates, p, generator, ensure_one)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))

    r = _rand(input_ids.shape, generator, device)
    to_mask = selected & (r < 0.8)
    to_random = selected & (r >= 0.8) & (r < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special.cpu().long()[special.cpu() < vocab_size]] = False
    pool = allowed.nonzero(as_tuple=False)[:, 0]
    draw = torch.randint(len(pool), tuple(input_ids.shape), generator=generator, device=generator.device)
    random_ids = pool.to(draw.device)[draw].to(device=device, dtype=input_ids.dtype)

    out = input_ids.clone()
    out[to_mask] = mask_token_id
    out[to_random] = random_ids[to_random]
    return out, labels


def mask_regions(features: torch.Tensor, maskable: torch.Tensor, prob: float | torch.Tensor,
                 generator: torch.Generator, zero_prob: float = 0.9,
                 ensure_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``maskable`` [B, R] regions with probability ``prob`` (scalar or [B, R]).

    Returns (features with ``zero_prob`` of the masked regions zeroed, region_masked [B, R] bool).
    ``features`` itself is left untouched: it is the MRFR target.
    """
    if features.dim() != 3 or maskable.shape != features.shape[:2]:
        raise ValueError(f"features [B, R, D] {tuple(features.shape)} and maskable [B, R] "
                         f"{tuple(maskable.shape)} do not match")
    p = _prob_tensor(prob, maskable.shape, features.device, "prob")
    selected = _select(maskable.bool(), p, generator, ensure_one)
    zero = selected & (_rand(maskable.shape, generator, features.device) < zero_prob)
    return features.masked_fill(zero[..., None], 0), selected


def mask_rt(tag_ids: torch.Tensor, tag_maskable: torch.Tensor, region_features: torch.Tensor,
            region_maskable: torch.Tensor, mask_token_id: int, vocab_size: int, special_ids: Sequence[int],
            generator: torch.Generator, prob: float = 0.15, ensure_one: bool = False) -> MaskingOutput:
    """Region-tag (R-T): independently mask 15% of the tag tokens (MLM) and 15% of the regions (MRM)."""
    ids, labels = mask_tokens(tag_ids, tag_maskable, prob, mask_token_id, vocab_size, special_ids,
                              generator, ensure_one)
    feats, masked = mask_regions(region_features, region_maskable, prob, generator, ensure_one=ensure_one)
    return MaskingOutput(ids, labels, feats, masked)


def mask_rn(input_ids: torch.Tensor, phrase_token_mask: torch.Tensor, region_features: torch.Tensor,
            region_sim: torch.Tensor, region_has_phrase: torch.Tensor, mask_token_id: int, vocab_size: int,
            special_ids: Sequence[int], generator: torch.Generator, prob: float = 0.15,
            phrase_token_sim: torch.Tensor | None = None, ensure_one: bool = False) -> MaskingOutput:
    """Region-noun-phrase (R-N): mask ONE modality per sample, so recovery must use the other.

    Candidates: noun-phrase tokens (``phrase_token_mask`` [B, L]) and regions matched to a phrase
    (``region_has_phrase`` [B, R]). A sample with both kinds picks text or regions with a fair coin;
    with one kind it uses that one. Regions are masked when rand < prob * cs (``region_sim`` [B, R]
    in [0, 1], the reference rule); tokens with ``prob``, or ``prob * phrase_token_sim`` [B, L] when
    the similarity of each token's phrase is given, so better-matched phrases are masked more too.
    """
    B = input_ids.shape[0]
    if region_sim.shape != region_has_phrase.shape or region_sim.shape != region_features.shape[:2]:
        raise ValueError(f"region_sim {tuple(region_sim.shape)}, region_has_phrase "
                         f"{tuple(region_has_phrase.shape)} and region_features {tuple(region_features.shape)} "
                         "must agree on [B, R]")
    if torch.isnan(region_sim).any() or (region_sim < 0).any() or (region_sim > 1).any():
        raise ValueError("region_sim must lie in [0, 1] (METHOD §3 clips negative similarities to 0)")
    special = torch.as_tensor(list(special_ids) + [mask_token_id], dtype=input_ids.dtype, device=input_ids.device)
    text_cand = phrase_token_mask.bool() & ~torch.isin(input_ids, special)
    text_prob = _prob_tensor(prob, input_ids.shape, input_ids.device, "prob")
    if phrase_token_sim is not None:
        text_prob = text_prob * _prob_tensor(phrase_token_sim, input_ids.shape, input_ids.device, "phrase_token_sim")
    region_cand = region_has_phrase.bool() & (region_sim > 0)
    region_prob = prob * region_sim.float()

    has_text = (text_cand & (text_prob > 0)).any(dim=1)
    has_region = region_cand.any(dim=1)
    coin = _rand((B,), generator, input_ids.device) < 0.5
    use_text = has_text & (~has_region | coin)
    use_region = has_region & ~use_text

    ids, labels = mask_tokens(input_ids, text_cand & use_text[:, None], text_prob, mask_token_id, vocab_size,
                              special_ids, generator, ensure_one)
    feats, masked = mask_regions(region_features, region_cand & use_region.to(region_cand.device)[:, None],
                                 region_prob, generator, ensure_one=ensure_one)
    modality = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    modality[use_text] = TEXT
    modality[use_region] = REGIONS
    return MaskingOutput(ids, labels, feats, masked, modality)


def mask_is(input_ids: torch.Tensor, attention_mask: torch.Tensor, is_positive: torch.Tensor,
            mask_token_id: int, vocab_size: int, special_ids: Sequence[int], generator: torch.Generator,
            prob: float = 0.15, ensure_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-sentence (I-S) MLM: ordinary 15% masking of real tokens, on positive pairs only.

    A negative (mismatched) pair gets no MLM labels: its sentence says nothing about the image.
    """
    maskable = attention_mask.bool() & is_positive.bool()[:, None]
    return mask_tokens(input_ids, maskable, prob, mask_token_id, vocab_size, special_ids, generator, ensure_one)


def phrase_targets(input_ids: torch.Tensor, token_phrase: torch.Tensor, region_phrase: torch.Tensor,
                   max_pieces: int = 8) -> torch.Tensor:
    """p-MRTC targets: the WordPiece ids of each region's matched phrase, [B, R, max_pieces], -100 padded.

    ``token_phrase`` [B, L]: phrase index of each token (-1 = not in a phrase); ``region_phrase``
    [B, R]: the region's best phrase index (-1 = none, as in matches.parquet). Pass the UNMASKED ids.
    Pieces beyond ``max_pieces`` are dropped (the first ones are kept).
    """
    if token_phrase.shape != input_ids.shape:
        raise ValueError(f"token_phrase {tuple(token_phrase.shape)} must match input_ids {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    match = (token_phrase[:, None, :] == region_phrase[:, :, None]) & (region_phrase[:, :, None] >= 0)  # [B, R, L]
    positions = torch.arange(L, device=input_ids.device).expand_as(match)
    order = torch.where(match, positions, torch.full_like(positions, L)).sort(dim=-1).values[..., :max_pieces]
    padded = torch.cat([input_ids, torch.full((B, 1), -100, dtype=input_ids.dtype, device=input_ids.device)], 1)
    out = padded.gather(1, order.reshape(B, -1)).reshape(order.shape)
    if out.shape[-1] < max_pieces:
        pad = torch.full((*out.shape[:-1], max_pieces - out.shape[-1]), -100, dtype=out.dtype, device=out.device)
        out = torch.cat([out, pad], dim=-1)
    return out


def sample_itm_negatives(batch_size: int, pool_size: int, generator: torch.Generator,
                         exclude: torch.Tensor | None = None,
                         neg_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose which pairs become ITM negatives and the random sentence each one gets.

    ``pool_size``: sentences to draw from (the corpus, or the batch for in-batch negatives).
    ``exclude``: [B] or [B, K] ids a sample's negative must NOT be (its positive; optionally all its
    retrieved top-K), entries < 0 ignored. The number of negatives is B * neg_fraction with
    stochastic rounding, so the expected split is exactly 50/50 even for odd or size-1 batches.
    Returns (is_negative [B] bool, negative_ids [B] long, -1 for positives).
    """
    if pool_size < 2:
        raise ValueError(f"ITM negatives need a pool of at least 2 sentences, got {pool_size}")
    if not 0.0 <= neg_fraction <= 1.0:
        raise ValueError(f"neg_fraction must be in [0, 1], got {neg_fraction}")
    dev = generator.device
    if exclude is not None:
        exclude = exclude.to(dev).long()
        if exclude.dim() == 1:
            exclude = exclude[:, None]
        if exclude.shape[0] != batch_size:
            raise ValueError(f"exclude has {exclude.shape[0]} rows for a batch of {batch_size}")
    expected = batch_size * neg_fraction
    k = int(expected) + int(torch.rand((), generator=generator, device=dev).item() < expected - int(expected))
    order = torch.randperm(batch_size, generator=generator, device=dev)
    is_negative = torch.zeros(batch_size, dtype=torch.bool, device=dev)
    is_negative[order[:k]] = True
    ids = torch.randint(pool_size, (batch_size,), generator=generator, device=dev)
    if exclude is not None:
        for _ in range(32):  # rejection: cheap when the pool is much larger than the exclusions
            bad = (ids[:, None] == exclude).any(dim=1) & is_negative
            if not bad.any():
                break
            ids[bad] = torch.randint(pool_size, (int(bad.sum()),), generator=generator, device=dev)
        bad = (ids[:, None] == exclude).any(dim=1) & is_negative
        for row in bad.nonzero(as_tuple=False)[:, 0].tolist():  # small pools: draw from the allowed set
            allowed = torch.ones(pool_size, dtype=torch.bool, device=dev)
            ex = exclude[row]
            allowed[ex[(ex >= 0) & (ex < pool_size)]] = False
            choices = allowed.nonzero(as_tuple=False)[:, 0]
            if len(choices) == 0:
                raise ValueError(f"sample {row}: every sentence of the pool is excluded; no negative possible")
            ids[row] = choices[torch.randint(len(choices), (1,), generator=generator, device=dev)]
    negative_ids = torch.where(is_negative, ids, torch.full_like(ids, -1))
    return is_negative, negative_ids
