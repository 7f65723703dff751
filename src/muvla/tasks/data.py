"""Readers for the downstream benchmarks in their official file formats (METHOD.md section 8).

Every loader returns ``(examples, LoadReport)``. Bad items never crash deep inside: each is
either skipped with a record (file, line, reason) or counted as a note when the item is still
usable (e.g. a VQA answer outside the vocabulary is dropped from the targets only).
``LoadReport.write_rejected(path)`` writes the records as ``rejected.jsonl``.

Formats:
- VQA v2: ``{"questions": [{question_id, image_id, question}]}`` and
  ``{"annotations": [{question_id, image_id, answers: [{answer}] * 10, multiple_choice_answer}]}``.
- NLVR2: JSON lines with identifier ``split-set-pair-sentence``, sentence, label "True"/"False";
  images ``{identifier minus last part}-img0.png`` / ``-img1.png`` in ``image_dir`` (or in
  ``image_dir/<directory>/`` when the line has a ``directory`` field, as in the train split).
- SNLI-VE: JSON lines with Flickr30K_ID, sentence2 (hypothesis), gold_label, pairID.
- RefCOCO+: the refer toolkit's ``refs(unc).p`` pickle (list of refs: ref_id, ann_id, image_id,
  split, category_id, sentences [{sent, tokens, raw, sent_id}]) plus ``instances.json`` (COCO
  style: images, annotations with bbox = x, y, w, h, categories). The JSON equivalent
  (``load_refcoco_json``) is one object ``{"refs": [...], "images": [...], "annotations": [...],
  "categories": [...]}``, i.e. the pickle's list under "refs" merged into instances.json.
- COCO captions: ``{"images": [...], "annotations": [{image_id, caption}]}``.

Image ids are kept as the files give them (int for COCO/VQA/RefCOCO, str for Flickr30K ids and
NLVR2 image stems); ``has_regions(image_id)`` callbacks receive exactly those values.
"""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from muvla.utils.shards import atomic_file

LABELS: tuple[str, str, str] = ("entailment", "neutral", "contradiction")
NO_REGIONS = "image has no regions"
OUT_OF_VOCAB = "answer outside vocabulary"

HasRegions = Callable[[Any], bool]


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


@dataclass
class VQAExample:
    question_id: int
    image_id: int
    question: str
    answers: list[str]  # the raw human answers (10 in VQA v2; empty for test questions)
    targets: dict[int, float]  # label id -> soft score (leave-one-out min(1, count/3))


@dataclass
class NLVR2Example:
    identifier: str
    sentence: str
    left_image: Path
    right_image: Path
    label: bool


@dataclass
class SNLIVEExample:
    pair_id: str
    image_id: str  # Flickr30K id (file stem)
    hypothesis: str
    label: int  # index into LABELS
    image_path: Path | None = None


@dataclass
class RefExample:
    ref_id: int
    ann_id: int
    image_id: int
    sentence: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    split: str
    sent_id: int = -1
    category_id: int = -1


@dataclass
class CaptionExample:
    image_id: int | str
    caption: str
    caption_id: int = -1


# --------------------------------------------------------------------------------------------
# Load report
# --------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One rejected item: where it is and why. ``line`` is 1-based for line files, the 0-based
    list index for JSON arrays, None when unknown; ``key`` names the item (e.g. question_id=5)."""

    file: str
    line: int | None
    reason: str
    key: str = ""


@dataclass
class LoadReport:
    """What a loader kept, skipped (with records) and merely noted (counts only)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    records: list[Record] = field(default_factory=list)

    def skip(self, file: str | Path, line: int | None, reason: str, key: str = "") -> None:
        self.skipped[reason] += 1
        self.records.append(Record(str(file), line, reason, key))

    def note(self, reason: str, n: int = 1) -> None:
        self.notes[reason] += n

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "n_skipped": self.n_skipped,
                "notes": dict(self.notes)}

    def write_rejected(self, path: str | Path) -> Path:
        """Write records as rejected.jsonl ({"file", "line", "reason", "key"} per line)."""
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records), encoding="utf-8")
        return path

    def summary(self) -> str:
        parts = [f"kept {self.kept}"]
        parts += [f"skipped {n} ({reason})" for reason, n in sorted(self.skipped.items())]
        parts += [f"noted {n} ({reason})" for reason, n in sorted(self.notes.items())]
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _iter_jsonl(path: str | Path, report: LoadReport) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line, object); bad lines are recorded as skipped, blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.skip(path, lineno, "invalid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                report.skip(path, lineno, "invalid JSON line")
                continue
            if not isinstance(obj, dict):
                report.skip(path, lineno, "line is not a JSON object")
                continue
            yield lineno, obj


def _missing(obj: dict, keys: Sequence[str], int_keys: Sequence[str] = ()) -> str | None:
    """Reason why ``obj`` lacks a field (or an integer id field), or None when it is complete."""
    for k in keys:
        if k not in obj or obj[k] is None:
            return f"missing field '{k}'"
    for k in int_keys:
        v = obj[k]
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())):
            return f"field '{k}' is not an integer id ({v!r})"
    return None


def _int_or(value: Any, default: int) -> int:
    """Optional integer field: its value when it is one, else ``default``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return default


# --------------------------------------------------------------------------------------------
# VQA v2
# --------------------------------------------------------------------------------------------


def vqa_soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Official soft score per (normalised) answer: mean over the leave-one-out subsets of
    min(1, count_in_subset / 3). With 10 humans: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0."""
    from muvla.tasks.metrics import normalize_vqa_answer  # metrics imports this module at load time

    norm = [normalize_vqa_answer(a) for a in answers]
    counts = Counter(norm)
    n = len(norm)
    if n == 0:
        return {}
    if n == 1:
        return {norm[0]: 1.0 / 3.0}
    # c subsets lose one copy (c - 1 left), n - c subsets keep all c copies
    return {a: (c * min(1.0, (c - 1) / 3.0) + (n - c) * min(1.0, c / 3.0)) / n for a, c in counts.items()}


class AnswerVocab:
    """Answer <-> label id map of the VQA classifier (e.g. the 3,129-answer trainval_ans2label.json)."""

    def __init__(self, answers: Sequence[str]):
        if len(set(answers)) != len(answers):
            raise ValueError("AnswerVocab: duplicate answers")
        self.answers: list[str] = list(answers)
        self.ans2label: dict[str, int] = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self.ans2label

    def label(self, answer: str) -> int | None:
        return self.ans2label.get(answer)

    def answer(self, label: int) -> str:
        return self.answers[label]

    @classmethod
    def from_file(cls, path: str | Path) -> AnswerVocab:
        """Read ``{answer: label}`` (ans2label) or ``[answer, ...]`` (label2ans) JSON."""
        data = _read_json(path)
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

    @classmethod
    def build(cls, annotations: Iterable[dict] | str | Path, min_count: int = 9) -> AnswerVocab:
        """Vocabulary of normalised ``multiple_choice_answer``s given by >= min_count questions
        (the bottom-up-attention recipe that yields the 3,129 answers); most frequent first."""
        from muvla.tasks.metrics import normalize_vqa_answer

        if isinstance(annotations, str | Path):
            annotations = _read_json(annotations).get("annotations", [])
        counts: Counter = Counter()
        for ann in annotations:
            if not isinstance(ann, dict):
                raise ValueError(f"AnswerVocab.build: annotation {ann!r} is not an object")
            mc = ann.get("multiple_choice_answer")
            if mc is None:  # fall back to the most common human answer
                human = [a["answer"] for a in ann.get("answers", []) if isinstance(a, dict) and "answer" in a]
                if not human:
                    continue
                mc = Counter(normalize_vqa_answer(a) for a in human).most_common(1)[0][0]
            counts[normalize_vqa_answer(mc)] += 1
        answers = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
        if not answers:
            raise ValueError(f"AnswerVocab.build: no answer occurs >= {min_count} times")
        return cls(answers)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.ans2label), encoding="utf-8")
        return path


def load_vqa(questions_json: str | Path, annotations_json: str | Path | None, answer_vocab: AnswerVocab,
             has_regions: HasRegions | None = None) -> tuple[list[VQAExample], LoadReport]:
    """VQA v2 questions (+ annotations when given; test splits have none).

    Skipped with a record: malformed question, duplicate question_id, question without an
    annotation (when annotations are given), image without regions. Noted only: answers outside
    the vocabulary (dropped from targets), questions with no answer in the vocabulary (kept, empty
    targets: they still count in the accuracy).
    """
    report = LoadReport()
    questions = _read_json(questions_json)
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"{questions_json}: expected a VQA questions file {{'questions': [...]}}")
    anns: dict[int, dict] | None = None
    if annotations_json is not None:
        ann_data = _read_json(annotations_json)
        if not isinstance(ann_data, dict) or not isinstance(ann_data.get("annotations"), list):
            raise ValueError(f"{annotations_json}: expected a VQA annotations file {{'annotations': [...]}}")
        anns = {}
        for i, a in enumerate(ann_data["annotations"]):
            bad = _missing(a, ("question_id", "answers"), ("question_id",)) if isinstance(a, dict) else "not an object"
            if bad is None and (not isinstance(a["answers"], list) or not a["answers"] or not all(
                    isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"])):
                bad = "'answers' must be a non-empty list of {'answer': str}"
            if bad:
                report.skip(annotations_json, i, f"malformed annotation: {bad}")
                continue
            anns[int(a["question_id"])] = a
    examples: list[VQAExample] = []
    seen: set[int] = set()
    for i, q in enumerate(questions["questions"]):
        bad = (_missing(q, ("question_id", "image_id", "question"), ("question_id", "image_id"))
               if isinstance(q, dict) else "not an object")
        if bad:
            report.skip(questions_json, i, f"malformed question: {bad}")
            continue
        qid = int(q["question_id"])
        key = f"question_id={qid}"
        if qid in seen:
            report.skip(questions_json, i, "duplicate question_id", key)
            continue
        seen.add(qid)
        if has_regions is not None and not has_regions(int(q["image_id"])):
            report.skip(questions_json, i, NO_REGIONS, key)
            continue
        answers: list[str] = []
        targets: dict[int, float] = {}
        if anns is not None:
            ann = anns.get(qid)
            if ann is None:
                report.skip(questions_json, i, "question has no annotation", key)
                continue
            answers = [a["answer"] for a in ann["answers"]]
            for ans, score in vqa_soft_scores(answers).items():
                label = answer_vocab.label(ans)
                if label is None:
                    report.note(OUT_OF_VOCAB)  # once per (question, distinct normalised answer)
                    continue
                targets[label] = score
            if not targets:
                report.note("no answer in vocabulary")
        examples.append(VQAExample(qid, int(q["image_id"]), str(q["question"]), answers, targets))
    report.kept = len(examples)
    return examples, report


# --------------------------------------------------------------------------------------------
# NLVR2
# --------------------------------------------------------------------------------------------


def nlvr2_image_stem(identifier: str) -> str:
    """'dev-850-0-0' -> 'dev-850-0' (the identifier minus its last, sentence, part)."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not 'split-set-pair-sentence'")
    return "-".join(parts[:-1])


def _parse_bool_label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def load_nlvr2(jsonl: str | Path, image_dir: str | Path | None,
               has_regions: HasRegions | None = None) -> tuple[list[NLVR2Example], LoadReport]:
    """NLVR2 JSON lines. With ``image_dir`` both images must exist (else skipped with the line);
    with ``image_dir=None`` (annotations only) image paths are bare file names and not checked.
    ``has_regions`` receives the image stems ('dev-850-0-img0')."""
    report = LoadReport()
    examples: list[NLVR2Example] = []
    seen: set[str] = set()
    root = Path(image_dir) if image_dir is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"NLVR2 image folder not found: {root}")
    for lineno, obj in _iter_jsonl(jsonl, report):
        bad = _missing(obj, ("identifier", "sentence", "label"))
        if bad:
            report.skip(jsonl, lineno, bad)
            continue
        ident = str(obj["identifier"])
        try:
            stem = nlvr2_image_stem(ident)
        except ValueError:
            report.skip(jsonl, lineno, "bad identifier", ident)
            continue
        if ident in seen:
            report.skip(jsonl, lineno, "duplicate identifier", ident)
            continue
        label = _parse_bool_label(obj["label"])
        if label is None:
            report.skip(jsonl, lineno, f"label {obj['label']!r} is not True/False", ident)
            continue
        names = [f"{stem}-img0.png", f"{stem}-img1.png"]
        if root is None:
            paths = [Path(n) for n in names]
        else:
            folders = [root] + ([root / str(obj["directory"])] if "directory" in obj else [])
            paths = [next((d / n for d in folders if (d / n).is_file()), folders[-1] / n) for n in names]
            lost = [p.name for p in paths if not p.is_file()]
            if lost:
                report.skip(jsonl, lineno, "missing NLVR2 image", f"{ident}: {', '.join(lost)}")
                continue
        if has_regions is not None and not all(has_regions(p.stem) for p in paths):
            report.skip(jsonl, lineno, NO_REGIONS, ident)
            continue
        seen.add(ident)
        examples.append(NLVR2Example(ident, str(obj["sentence"]), paths[0], paths[1], label))
    report.kept = len(examples)
    return examples, report


# --------------------------------------------------------------------------------------------
# SNLI-VE
# --------------------------------------------------------------------------------------------


def load_snli_ve(jsonl: str | Path, image_dir: str | Path | None = None,
                 has_regions: HasRegions | None = None) -> tuple[list[SNLIVEExample], LoadReport]:
    """SNLI-VE JSON lines (Flickr30K_ID, sentence2, gold_label, pairID). A gold_label outside
    LABELS (e.g. SNLI's '-' = no consensus) is skipped with its line. With ``image_dir`` the image
    ``<Flickr30K_ID>.jpg`` must exist."""
    report = LoadReport()
    examples: list[SNLIVEExample] = []
    seen: set[str] = set()
    root = Path(image_dir) if image_dir is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"SNLI-VE image folder not found: {root}")
    for lineno, obj in _iter_jsonl(jsonl, report):
        bad = _missing(obj, ("Flickr30K_ID", "sentence2", "gold_label"))
        if bad:
            report.skip(jsonl, lineno, bad)
            continue
        image_id = str(obj["Flickr30K_ID"])
        pair_id = str(obj.get("pairID", f"line-{lineno}"))
        if obj["gold_label"] not in LABELS:
            report.skip(jsonl, lineno, f"label {obj['gold_label']!r} is not one of {'/'.join(LABELS)}", pair_id)
            continue
        if pair_id in seen:
            report.skip(jsonl, lineno, "duplicate pairID", pair_id)
            continue
        image_path = None
        if root is not None:
            image_path = root / f"{image_id}.jpg"
            if not image_path.is_file():
                report.skip(jsonl, lineno, "missing SNLI-VE image", f"{pair_id}: {image_path.name}")
                continue
        if has_regions is not None and not has_regions(image_id):
            report.skip(jsonl, lineno, NO_REGIONS, pair_id)
            continue
        seen.add(pair_id)
        examples.append(SNLIVEExample(pair_id, image_id, str(obj["sentence2"]), LABELS.index(obj["gold_label"]),
                                      image_path))
    report.kept = len(examples)
    return examples, report


# --------------------------------------------------------------------------------------------
# RefCOCO+
# --------------------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """The refs pickle holds only lists, dicts, strings and numbers: refuse anything that would
    import code, so a hostile file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refs pickle refers to {module}.{name}: only plain data is allowed")


def read_refs_pickle(path: str | Path) -> list[dict]:
    """Read refer toolkit ``refs(unc).p`` (written by Python 2: byte strings decoded as latin-1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        refs = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a refer toolkit refs pickle ({e})") from e
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _refcoco_examples(refs: list, instances: dict, split: str | None, refs_file: str | Path,
                      instances_file: str | Path, has_regions: HasRegions | None) -> tuple[list[RefExample], LoadReport]:
    report = LoadReport()
    if not isinstance(instances, dict) or not isinstance(instances.get("annotations"), list):
        raise ValueError(f"{instances_file}: expected COCO instances with an 'annotations' list")
    boxes: dict[int, list[float]] = {}
    for i, ann in enumerate(instances["annotations"]):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox)
                or _missing(ann, ("id",), ("id",))):
            report.skip(instances_file, i, "malformed annotation (needs id and bbox [x, y, w, h])")
            continue
        boxes[int(ann["id"])] = [float(v) for v in bbox]
    examples: list[RefExample] = []
    for i, ref in enumerate(refs):
        bad = (_missing(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"), ("ref_id", "ann_id", "image_id"))
               if isinstance(ref, dict) else "not a dict")
        if bad is None and not isinstance(ref["sentences"], list):
            bad = "'sentences' is not a list"
        if bad:
            report.skip(refs_file, i, f"malformed ref: {bad}")
            continue
        if split is not None and ref["split"] != split:
            continue
        key = f"ref_id={ref['ref_id']}"
        bbox = boxes.get(int(ref["ann_id"]))
        if bbox is None:
            report.skip(refs_file, i, "ref's ann_id not in instances", key)
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            report.skip(refs_file, i, "empty ground-truth box", key)
            continue
        if has_regions is not None and not has_regions(ref["image_id"]):
            for _ in ref["sentences"]:
                report.skip(refs_file, i, NO_REGIONS, key)
            continue
        x, y, w, h = bbox
        for s in ref["sentences"]:
            text = s.get("sent", s.get("raw")) if isinstance(s, dict) else None
            if not text:
                report.skip(refs_file, i, "sentence without text", key)
                continue
            examples.append(RefExample(int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"]), str(text),
                                       (x, y, x + w, y + h), str(ref["split"]), _int_or(s.get("sent_id"), -1),
                                       _int_or(ref.get("category_id"), -1)))
    report.kept = len(examples)
    return examples, report


def load_refcoco(refs_pickle: str | Path, instances_json: str | Path, split: str | None,
                 has_regions: HasRegions | None = None) -> tuple[list[RefExample], LoadReport]:
    """RefCOCO+ from the refer toolkit files; one example per expression (sentence) of ``split``
    (e.g. 'train', 'val', 'testA', 'testB'; None = all). Skips are counted per expression so the
    accuracy over ALL expressions can count them as wrong."""
    refs = read_refs_pickle(refs_pickle)
    return _refcoco_examples(refs, _read_json(instances_json), split, refs_pickle, instances_json, has_regions)


def load_refcoco_json(path: str | Path, split: str | None,
                      has_regions: HasRegions | None = None) -> tuple[list[RefExample], LoadReport]:
    """RefCOCO+ from the JSON equivalent: instances.json with the refs list under "refs"."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("refs"), list):
        raise ValueError(f"{path}: expected {{'refs': [...], 'annotations': [...], ...}}")
    return _refcoco_examples(data["refs"], data, split, path, path, has_regions)


# --------------------------------------------------------------------------------------------
# COCO captions (retrieval)
# --------------------------------------------------------------------------------------------


def load_coco_captions(path: str | Path, has_regions: HasRegions | None = None
                       ) -> tuple[list[CaptionExample], LoadReport]:
    """COCO captions JSON; captions sorted by (image_id, caption id) for deterministic order."""
    report = LoadReport()
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO captions file with an 'annotations' list")
    # Region stores name images by file stem; COCO's zero-padded stems also resolve from the int id,
    # any other file name (e.g. "astronaut.png") must be mapped through the images list.
    named = {img["id"]: Path(str(img["file_name"])).stem for img in data.get("images", [])
             if isinstance(img, dict) and "id" in img and "file_name" in img
             and not Path(str(img["file_name"])).stem.isdigit()}
    examples: list[CaptionExample] = []
    for i, ann in enumerate(data["annotations"]):
        bad = _missing(ann, ("image_id", "caption")) if isinstance(ann, dict) else "not an object"
        if bad:
            report.skip(path, i, f"malformed caption: {bad}")
            continue
        if ann["image_id"] in named:
            ann = {**ann, "image_id": named[ann["image_id"]]}
        caption = str(ann["caption"]).strip()
        if not caption:
            report.skip(path, i, "empty caption", f"image_id={ann['image_id']}")
            continue
        if has_regions is not None and not has_regions(ann["image_id"]):
            report.skip(path, i, NO_REGIONS, f"image_id={ann['image_id']}")
            continue
        examples.append(CaptionExample(ann["image_id"], caption, _int_or(ann.get("id"), i)))
    examples.sort(key=lambda e: (str(e.image_id), e.caption_id))
    report.kept = len(examples)
    return examples, report


def caption_index(examples: Sequence[CaptionExample]) -> tuple[list[int | str], list[int]]:
    """(image ids in first-seen order, text_to_image row per caption) for ``retrieval_recall``."""
    rows: dict[int | str, int] = {}
    text_to_image = []
    for ex in examples:
        text_to_image.append(rows.setdefault(ex.image_id, len(rows)))
    return list(rows), text_to_image
