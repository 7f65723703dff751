"""Pre-training losses: targets, reductions, per-sample values and weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from muvla.model import ITMLoss, MLMLoss, Model, ModelConfig, MRCLoss, MRFRLoss, PMRTCLoss
from muvla.pretraining.masking import mask_regions


def test_mlm_loss_mean_per_sample_and_weights() -> None:
    torch.manual_seed(0)
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[0, 3], labels[2, 0] = 4, 2, 7
    logits = torch.randn(3, 10, requires_grad=True)
    out = MLMLoss()(logits, labels, return_per_sample=True)
    ce = F.cross_entropy(logits, torch.tensor([4, 2, 7]), reduction="none")
    torch.testing.assert_close(out["mlm"], ce.mean())
    torch.testing.assert_close(out["mlm_per_sample"], torch.stack([ce[:2].mean(), torch.tensor(0.0), ce[2]]))
    assert int(out["mlm_count"]) == 3
    w = torch.tensor([0.5, 1.0, 2.0])
    weighted = MLMLoss()(logits, labels, sample_weight=w)["mlm"]
    torch.testing.assert_close(weighted, (0.5 * ce[0] + 0.5 * ce[1] + 2.0 * ce[2]) / 3)
    weighted.backward()
    assert logits.grad is not None
    with pytest.raises(ValueError, match="same positions_mask"):
        MLMLoss()(logits[:2], labels)


def test_empty_selection_gives_zero_loss_in_graph() -> None:
    logits = torch.randn(0, 10, requires_grad=True)
    out = MLMLoss()(logits, torch.full((2, 4), -100), return_per_sample=True)
    assert out["mlm"].requires_grad and out["mlm"].detach().item() == 0.0
    assert torch.equal(out["mlm_per_sample"], torch.zeros(2))


def test_mrc_cross_entropy_kl_and_unknown_class() -> None:
    torch.manual_seed(0)
    masked = torch.tensor([[True, False, True], [False, True, False]])
    logits = torch.randn(3, 4)
    ids = torch.tensor([[1, 0, -1], [2, 3, 0]])  # the second masked region of sample 0 has no class
    out = MRCLoss()(logits, masked, class_ids=ids, return_per_sample=True)
    ce = F.cross_entropy(logits, torch.tensor([1, 0, 3]), reduction="none")
    assert int(out["mrc_count"]) == 2
    torch.testing.assert_close(out["mrc"], (ce[0] + ce[2]) / 2)
    probs = torch.rand(2, 3, 4)
    out_kl = MRCLoss()(logits, masked, class_ids=ids, class_probs=probs)
    p = probs[masked] / probs[masked].sum(-1, keepdim=True)
    kl = F.kl_div(F.log_softmax(logits, -1), p, reduction="none").sum(-1)
    torch.testing.assert_close(out_kl["mrc"], kl.mean())
    assert int(out_kl["mrc_count"]) == 3
    with pytest.raises(ValueError, match="num_region_classes"):
        MRCLoss()(logits, masked, class_ids=torch.full((2, 3), 9))


def test_mrfr_regresses_the_original_feature_not_the_zeroed_input() -> None:
    g = torch.Generator().manual_seed(0)
    original = torch.randn(4, 6, 8, generator=g) + 3.0
    maskable = torch.ones(4, 6, dtype=torch.bool)
    masked_feats, region_masked = mask_regions(original, maskable, 0.5, g)
    assert region_masked.any()
    assert (masked_feats[region_masked] == 0).all(-1).any()  # some inputs really were zeroed
    perfect = MRFRLoss()(original[region_masked].clone(), original, region_masked)
    assert float(perfect["mrfr"]) == 0.0
    zeros_pred = MRFRLoss()(torch.zeros_like(original[region_masked]), original, region_masked)
    assert float(zeros_pred["mrfr"]) > 1.0  # predicting the zeroed input is penalised


def test_mrfr_end_to_end_target_is_original_feature() -> None:
    """The loss on model predictions uses the unmasked features even though the input was zeroed."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                      max_position_embeddings=8, region_feature_dim=4, num_region_classes=3)
    model = Model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 4, generator=g)
    masked_feats, rm = mask_regions(feats, torch.ones(2, 3, dtype=torch.bool), 1.0, g, zero_prob=1.0)
    out = model(torch.ones(2, 4, dtype=torch.long), region_features=masked_feats, region_positions=torch.rand(2, 3, 5))
    pred = model.mrfr_head(out.region_hidden, rm)
    loss = MRFRLoss()(pred, feats, rm)["mrfr"]
    torch.testing.assert_close(loss, (pred - feats[rm]).pow(2).mean())
    assert not torch.allclose(loss, (pred - masked_feats[rm]).pow(2).mean())


def test_pmrtc_soft_multilabel_over_phrase_pieces() -> None:
    torch.manual_seed(0)
    masked = torch.tensor([[True, True], [False, True]])
    logits = torch.randn(3, 12)
    targets = torch.full((2, 2, 3), -100)
    targets[0, 0, :3] = torch.tensor([4, 5, 6])  # three-piece phrase
    targets[0, 1, :1] = 9                         # one-piece phrase
    # region (1, 1) is masked but has no phrase piece -> left out
    out = PMRTCLoss()(logits, masked, targets, return_per_sample=True)
    logp = F.log_softmax(logits, -1)
    first = -(logp[0, 4] + logp[0, 5] + logp[0, 6]) / 3
    second = F.cross_entropy(logits[1:2], torch.tensor([9]))
    assert int(out["pmrtc_count"]) == 2
    torch.testing.assert_close(out["pmrtc"], (first + second) / 2)
    torch.testing.assert_close(out["pmrtc_per_sample"], torch.stack([(first + second) / 2, torch.tensor(0.0)]))
    bad = targets.clone()
    bad[0, 0, 0] = 99
    with pytest.raises(ValueError, match="vocabulary"):
        PMRTCLoss()(logits, masked, bad)


def test_itm_bce_and_detached_probability() -> None:
    logits = torch.tensor([2.0, -1.0, 0.0], requires_grad=True)
    labels = torch.tensor([1, 0, 1])
    out = ITMLoss()(logits, labels, return_per_sample=True)
    expected = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    torch.testing.assert_close(out["itm_per_sample"], expected)
    torch.testing.assert_close(out["itm"], expected.mean())
    torch.testing.assert_close(out["itm_prob"], torch.sigmoid(logits.detach()))
    assert not out["itm_prob"].requires_grad
    with pytest.raises(ValueError, match="sample_weight"):
        ITMLoss()(logits, labels, sample_weight=torch.ones(2))
