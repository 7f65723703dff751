"""Pre-training losses (METHOD §5), one small module each.

Every loss takes predictions gathered at the labelled positions only (the heads'
``positions_mask`` order, i.e. ``x[mask]`` row-major) plus the [B, ...] masks that say where they came
from, and returns a dict:

    out[name]                 scalar, the term to optimise: mean over labelled items of
                              sample_weight[b(i)] * loss_i (plain item mean when no weight is given);
                              0 (still in the graph) when nothing is labelled
    out[name + "_count"]      scalar long, number of items that contributed
    out[name + "_per_sample"] [B], only with return_per_sample=True: mean loss of each sample's items
                              (0 for a sample without any)

``sample_weight`` [B] is how the curriculum applies its per-sample w_ITM (METHOD §6) without the
reference code's accidental batch-mean. Items are weighted at item level so that an unweighted call
is the ordinary token-mean BERT loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _reduce(name: str, item_loss: torch.Tensor, sample_index: torch.Tensor, batch_size: int,
            sample_weight: torch.Tensor | None, return_per_sample: bool,
            anchor: torch.Tensor) -> dict[str, torch.Tensor]:
    """item_loss [M] of samples sample_index [M] -> the dict described in the module docstring."""
    count = torch.tensor(item_loss.numel(), device=item_loss.device)
    if sample_weight is not None:
        if sample_weight.shape != (batch_size,):
            raise ValueError(f"sample_weight must have shape [{batch_size}], got {tuple(sample_weight.shape)}")
        weighted = item_loss * sample_weight.to(item_loss.dtype)[sample_index]
    else:
        weighted = item_loss
    # nothing labelled: a zero that stays in the graph (DDP needs every parameter used), never NaN
    loss = anchor.sum() * 0.0 if item_loss.numel() == 0 else weighted.mean()
    out = {name: loss, f"{name}_count": count}
    if return_per_sample:
        sums = torch.zeros(batch_size, dtype=item_loss.dtype, device=item_loss.device)
        sums = sums.index_add(0, sample_index, item_loss)
        counts = torch.zeros(batch_size, dtype=item_loss.dtype, device=item_loss.device)
        counts = counts.index_add(0, sample_index, torch.ones_like(item_loss))
        out[f"{name}_per_sample"] = sums / counts.clamp(min=1)
    return out


def _sample_index(mask: torch.Tensor) -> torch.Tensor:
    """Batch index of every True of a [B, N] mask, in ``x[mask]`` order."""
    return mask.nonzero(as_tuple=False)[:, 0]


def _check_rows(name: str, preds: torch.Tensor, mask: torch.Tensor) -> None:
    n = int(mask.sum())
    if preds.shape[0] != n:
        raise ValueError(f"{name}: got {preds.shape[0]} prediction rows but the mask selects {n}; "
                         "call the head with the same positions_mask as the loss")


class MLMLoss(nn.Module):
    """Cross entropy of masked tokens. Labels: [B, L] token id at masked positions, -100 elsewhere."""

    name = "mlm"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, sample_weight: torch.Tensor | None = None,
                return_per_sample: bool = False) -> dict[str, torch.Tensor]:
        """logits [M, V] = ``mlm_head(text_hidden, labels != -100)``; labels [B, L]."""
        mask = labels != -100
        _check_rows(self.name, logits, mask)
        item = F.cross_entropy(logits.float(), labels[mask], reduction="none")
        return _reduce(self.name, item, _sample_index(mask), labels.shape[0], sample_weight,
                       return_per_sample, logits)


class MRCLoss(nn.Module):
    """Masked region classification: CE to the detector class id, or KL to its class distribution.

    With ``class_probs`` the target is the (renormalised) distribution, KL(p || softmax(logits));
    a region whose distribution sums to 0 falls back to its class id. A masked region with neither
    (class id -1 and no distribution) has nothing to classify: it is left out and not counted in
    ``mrc_count`` (it still trains MRFR).
    """

    name = "mrc"

    def forward(self, logits: torch.Tensor, region_masked: torch.Tensor, class_ids: torch.Tensor | None = None,
                class_probs: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None,
                return_per_sample: bool = False) -> dict[str, torch.Tensor]:
        """logits [M, C] = ``mrc_head(region_hidden, region_masked)``; class_ids [B, R] (-1 unknown);
        class_probs [B, R, C] or None."""
        if class_ids is None and class_probs is None:
            raise ValueError("MRCLoss needs class_ids [B, R] or class_probs [B, R, C]")
        mask = region_masked.bool()
        _check_rows(self.name, logits, mask)
        logp = F.log_softmax(logits.float(), dim=-1)
        M = logits.shape[0]
        item = torch.zeros(M, device=logits.device)
        valid = torch.zeros(M, dtype=torch.bool, device=logits.device)
        if class_ids is not None:
            ids = class_ids[mask].long()
            if (ids >= logits.shape[1]).any():
                raise ValueError(f"class id {int(ids.max())} >= num_region_classes {logits.shape[1]}")
            has_id = ids >= 0
            ce = -logp.gather(1, ids.clamp(min=0)[:, None]).squeeze(1)
            item = torch.where(has_id, ce, item)
            valid = has_id
        if class_probs is not None:
            if class_probs.shape[-1] != logits.shape[1]:
                raise ValueError(f"class_probs has {class_probs.shape[-1]} classes, the head {logits.shape[1]}")
            p = class_probs[mask].float().clamp(min=0)
            total = p.sum(-1, keepdim=True)
            has_p = total.squeeze(1) > 0
            p = p / total.clamp(min=1e-12)
            kl = (torch.xlogy(p, p) - p * logp).sum(-1)
            item = torch.where(has_p, kl, item)
            valid = valid | has_p
        idx = _sample_index(mask)
        return _reduce(self.name, item[valid], idx[valid], mask.shape[0], sample_weight, return_per_sample, logits)


class MRFRLoss(nn.Module):
    """Masked region feature regression: mean squared error to the ORIGINAL (un-zeroed) feature.

    Pass the features as they were BEFORE masking; the reference code regressed the zeroed input
    (METHOD §5), which teaches the model to output zeros.
    """

    name = "mrfr"

    def forward(self, predicted: torch.Tensor, original_features: torch.Tensor, region_masked: torch.Tensor,
                sample_weight: torch.Tensor | None = None,
                return_per_sample: bool = False) -> dict[str, torch.Tensor]:
        """predicted [M, D] = ``mrfr_head(region_hidden, region_masked)``; original_features [B, R, D]."""
        mask = region_masked.bool()
        _check_rows(self.name, predicted, mask)
        target = original_features[mask].float()
        if target.shape != predicted.shape:
            raise ValueError(f"mrfr: prediction {tuple(predicted.shape)} vs target {tuple(target.shape)}")
        item = (predicted.float() - target).pow(2).mean(-1)
        return _reduce(self.name, item, _sample_index(mask), mask.shape[0], sample_weight,
                       return_per_sample, predicted)


class PMRTCLoss(nn.Module):
    """Phrase-guided masked region-to-token classification (p-MRTC, METHOD §5).

    A masked region predicts, through the MLM head over the whole vocabulary, the WordPieces of its
    matched phrase. A phrase has several pieces ("a red sofa" -> a, red, so, ##fa): we use a SOFT
    multi-label target, uniform over the phrase's pieces, i.e. the item loss is the mean of
    -log p(piece) over its pieces. This uses every piece, needs no extra randomness, and equals
    plain CE for a one-piece phrase. Callers may drop determiners from the targets first.
    A masked region without any target piece is left out (not counted in ``pmrtc_count``).
    """

    name = "pmrtc"

    def forward(self, logits: torch.Tensor, region_masked: torch.Tensor, target_ids: torch.Tensor,
                sample_weight: torch.Tensor | None = None,
                return_per_sample: bool = False) -> dict[str, torch.Tensor]:
        """logits [M, V] = ``mlm_head(region_hidden, region_masked)``; target_ids [B, R, P] piece ids
        of each region's phrase, -100 padded (see ``muvla.pretraining.masking.phrase_targets``)."""
        mask = region_masked.bool()
        _check_rows(self.name, logits, mask)
        if target_ids.shape[:2] != mask.shape:
            raise ValueError(f"target_ids {tuple(target_ids.shape)} does not match region_masked {tuple(mask.shape)}")
        targets = target_ids[mask].long()  # [M, P]
        valid = targets != -100
        if (targets[valid] >= logits.shape[1]).any() or (targets[valid] < 0).any():
            raise ValueError("p-MRTC target id outside the vocabulary")
        logp = F.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(1, targets.clamp(min=0)) * valid
        n = valid.sum(-1)
        item = -picked.sum(-1) / n.clamp(min=1)
        keep = n > 0
        idx = _sample_index(mask)
        return _reduce(self.name, item[keep], idx[keep], mask.shape[0], sample_weight, return_per_sample, logits)


class ITMLoss(nn.Module):
    """Image-text matching: binary cross entropy on one logit per pair (label 1 = matched).

    Also returns ``itm_prob`` [B] = sigmoid(logit), detached: the curriculum's per-sample w_ITM.
    """

    name = "itm"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, sample_weight: torch.Tensor | None = None,
                return_per_sample: bool = False) -> dict[str, torch.Tensor]:
        """logits [B] = ``itm_head(pooled)``; labels [B] in {0, 1}."""
        if logits.shape != labels.shape:
            raise ValueError(f"itm: logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}")
        item = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        idx = torch.arange(labels.shape[0], device=labels.device)
        out = _reduce(self.name, item, idx, labels.shape[0], sample_weight, return_per_sample, logits)
        out["itm_prob"] = torch.sigmoid(logits.detach().float())
        return out
