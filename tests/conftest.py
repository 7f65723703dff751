"""Shared test set-up: the real data folder, quiet progress bars, one torch thread for tiny models.

Tests that read ``../shared/data`` (relative to the repository) are marked ``shared_data`` and take
the ``shared_data`` fixture; both skip the test with the reason when the folder is absent, so the
suite passes on a fresh clone.

Optional assets that ``.ci/run`` installs (headless Chromium; later the CenterNet weights) go through
``require_or_skip``: a missing one skips the test with the reason on a user's machine, and fails it
in CI (``CI=true``), where it means the set-up is broken rather than that the test does not apply.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("MUVLA_NO_PROGRESS", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("shared_data") is not None and not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (../shared/data relative to the repository)")


def in_ci() -> bool:
    """True under CI (the ``CI`` environment variable set to true, as CI services and ``.ci/run`` do)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_or_skip(available: object, what: str, how: str) -> None:
    """Go on when ``available`` is truthy; else skip (a user's machine) or fail (CI) with one line.

    ``what`` names the missing asset, ``how`` says how to get it, e.g.
    ``require_or_skip(shutil.which("chromium"), "chromium", "apt-get install chromium")``.
    """
    if available:
        return
    if in_ci():
        pytest.fail(f"{what} is required in CI (CI={os.environ.get('CI')}) but missing; {how}", pytrace=False)
    pytest.skip(f"{what} not installed ({how})")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; the test is skipped with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (../shared/data relative to the repository)")
    return SHARED_DATA


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models run much faster on one intra-op thread next to other busy processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
