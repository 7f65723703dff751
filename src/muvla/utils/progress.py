"""Progress bars for long stages (tqdm; quiet on non-main ranks and when disabled)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             unit: str = "it") -> Iterable[T]:
    """Wrap ``items`` in a bar on rank 0; MUVLA_NO_PROGRESS=1 silences it (tests, logs)."""
    quiet = (not enabled or os.environ.get("MUVLA_NO_PROGRESS") == "1"
             or int(os.environ.get("RANK", 0)) != 0)
    return tqdm(items, desc=desc, total=total, disable=quiet, unit=unit, file=sys.stderr,
                dynamic_ncols=True)
