"""The downstream tasks by name: one explicit mapping, read by fine-tune, evaluate and the table.

Adding a task: write its module (a :class:`~muvla.tasks.spec.TaskSpec`) and add one line here.
Names are matched case-insensitively, aliases included ('SNLI-VE' and 'vqav2' work everywhere).
"""

from __future__ import annotations

from muvla.tasks.image_text_retrieval import RETRIEVAL
from muvla.tasks.nlvr2 import NLVR2
from muvla.tasks.refcoco import REFCOCO
from muvla.tasks.snli_ve import SNLI_VE
from muvla.tasks.spec import TaskSpec
from muvla.tasks.vqa import VQA
from muvla.utils.config import ConfigError

# canonical name -> spec; the order is the table's column order
TASKS: dict[str, TaskSpec] = {
    "vqa": VQA,
    "nlvr2": NLVR2,
    "snli_ve": SNLI_VE,
    "refcoco+": REFCOCO,
    "retrieval": RETRIEVAL,
}


def get_task(name: str) -> TaskSpec:
    """The spec of a task name or alias; an unknown name is one clear line (ConfigError)."""
    key = name.strip().lower()
    if key in TASKS:
        return TASKS[key]
    for spec in TASKS.values():
        if key in spec.aliases:
            return spec
    raise ConfigError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def task_names(aliases: bool = False) -> list[str]:
    """Canonical task names in table order (with ``aliases``: followed by every alias), e.g. for
    the CLI's ``--task`` choices."""
    names = list(TASKS)
    if aliases:
        names += [alias for spec in TASKS.values() for alias in spec.aliases]
    return names
