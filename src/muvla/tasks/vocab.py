"""The answer vocabulary of tasks whose classes are learnt from the training data (VQA's answers).

Shared by the VQA module (which builds it from annotations) and the stages (which save it into a
fine-tuned model folder and read it back for evaluation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from muvla.tasks.files import read_json
from muvla.utils.shards import atomic_file


class AnswerVocab:
    """Answer <-> label id map of a classifier (e.g. the 3,129-answer trainval_ans2label.json)."""

    def __init__(self, answers: Sequence[str]):
        if len(set(answers)) != len(answers):
            raise ValueError("AnswerVocab: duplicate answers")
        self.answers: list[str] = list(answers)
        self.ans2label: dict[str, int] = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self.ans2label

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerVocab) and self.answers == other.answers

    def label(self, answer: str) -> int | None:
        return self.ans2label.get(answer)

    def answer(self, label: int) -> str:
        return self.answers[label]

    @classmethod
    def from_file(cls, path: str | Path) -> AnswerVocab:
        """Read ``{answer: label}`` (ans2label) or ``[answer, ...]`` (label2ans) JSON."""
        data = read_json(path)
        if isinstance(data, dict):
            ids = list(data.values())
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids) or sorted(ids) != list(range(len(ids))):
                raise ValueError(f"{path}: ans2label ids must be the integers 0..{len(data) - 1}, each once")
            answers = [""] * len(data)
            for a, i in data.items():
                answers[i] = a
            return cls(answers)
        if isinstance(data, list) and all(isinstance(a, str) for a in data):
            return cls(data)
        raise ValueError(f"{path}: expected an {{answer: id}} object or a list of answers")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.ans2label), encoding="utf-8")
        return path
