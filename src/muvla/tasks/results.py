"""results.json: the record fine-tune and evaluate write and ``muvla table`` reads.

    {"model": "muvla", "task": "vqa/val", "metrics": {"accuracy": 0.702, "n": 10, ...}}

``task`` is ``<task>/<split>``; ``metrics`` are fractions in [0, 1] and hold at least the task's
headline metric (``TaskSpec.headline``). ``muvla table`` also accepts a dict of tasks and lists of
records (see ``muvla.tasks.table``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from muvla.utils.shards import atomic_file


def results_entry(model_name: str, task: str, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One results record in the ``muvla table`` schema (task '<task>/<split>')."""
    return {"model": model_name, "task": f"{task}/{split}" if split else task, "metrics": metrics}


def write_results(path: Path, model_name: str, task: str, split: str, metrics: dict[str, Any]) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results_entry(model_name, task, split, metrics), indent=1), encoding="utf-8")
    return path
