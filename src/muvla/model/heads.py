"""Prediction heads on top of the single-stream encoder (METHOD §5).

Every head that predicts per-token or per-region outputs takes an optional boolean ``positions_mask``
and GATHERS the selected positions before its projection: with 15% masking, computing the
30k-word vocabulary logits only where there is a label is ~7x less work than the full-sequence
reference implementation, and the result is identical (tested).
Gathered rows are in row-major order of ``positions_mask`` (i.e. the order of ``x[mask]``), which
is the order the losses in ``muvla.model.losses`` expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gather_positions(hidden: torch.Tensor, positions_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, N, H] + [B, N] bool -> [M, H] (M = number of True); no mask -> [B, N, H] unchanged."""
    if positions_mask is None:
        return hidden
    if positions_mask.shape != hidden.shape[:-1]:
        raise ValueError(f"positions_mask {tuple(positions_mask.shape)} does not match hidden "
                         f"{tuple(hidden.shape[:-1])}")
    return hidden[positions_mask.bool()]


class MLMHead(nn.Module):
    """BERT's masked-language-model head: dense + GELU + LayerNorm, then the word-embedding matrix.

    The decoder weight is the encoder's word-embedding Parameter (tied), so the head adds only
    H*H + 2H + V parameters. p-MRTC reuses this head on region states: a region "speaks" a WordPiece.
    """

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float,
                 word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: same Parameter object
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, positions_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, N, H], positions_mask [B, N] bool -> logits [M, V] (or [B, N, V] without a mask)."""
        x = gather_positions(hidden, positions_mask)
        x = self.layer_norm(F.gelu(self.dense(x)))
        return self.decoder(x) + self.bias


class MRCHead(nn.Module):
    """Masked region classification: region state -> detector class logits."""

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor, positions_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, R, H], positions_mask [B, R] bool -> logits [M, C]."""
        return self.classifier(gather_positions(hidden, positions_mask))


class MRFRHead(nn.Module):
    """Masked region feature regression: a Linear head back to the detector feature space (METHOD §5)."""

    def __init__(self, hidden_size: int, feature_dim: int) -> None:
        super().__init__()
        self.regressor = nn.Linear(hidden_size, feature_dim)

    def forward(self, hidden: torch.Tensor, positions_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, R, H], positions_mask [B, R] bool -> predicted features [M, D]."""
        return self.regressor(gather_positions(hidden, positions_mask))


class ITMHead(nn.Module):
    """Image-text matching on the pooled [CLS]: ONE logit, sigmoid = P(match).

    One logit + binary cross entropy is what METHOD §5 specifies, and sigmoid(logit) is directly the
    per-sample curriculum weight w_ITM. When the BERT checkpoint has an NSP head (2-way, class 0 =
    "is next"), ``from_bert`` initialises this logit as l0 - l1, so sigmoid gives exactly NSP's
    softmax probability of class 0.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, H] -> logits [B]."""
        return self.classifier(pooled).squeeze(-1)
