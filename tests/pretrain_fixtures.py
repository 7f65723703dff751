"""Shared fixtures for the pre-training tests: a tiny synthetic corpus in the DESIGN.md formats.

Import the fixtures into a test module with ``from pretrain_fixtures import tiny_corpus, tiny_model_cfg``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from muvla.corpus.synthetic import write_synthetic_corpus

# a model small enough for hundreds of CPU steps, with the real WordPiece vocabulary
TINY_MODEL: dict[str, Any] = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                              "hidden_dropout": 0.0, "attention_dropout": 0.0}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of two object classes each, 45 sentences naming class pairs, K = 3 per image."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("pretrain_corpus"), num_images=24, feature_dim=16)


@pytest.fixture()
def tiny_model_cfg() -> dict[str, Any]:
    return dict(TINY_MODEL)


def tiny_run_overrides(out: Path, corpus: Path, **extra: Any) -> dict[str, Any]:
    """PretrainConfig overrides for a fast CPU run on the tiny corpus."""
    base = dict(out=str(out), corpus=str(corpus), init="random", model=dict(TINY_MODEL), batch_size=8, lr=2e-3,
                warmup_ratio=0.0, log_every=2, tensorboard=False, plot=False, device="cpu", precision="fp32")
    base.update(extra)
    return base
