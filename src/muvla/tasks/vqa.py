"""VQA v2 (METHOD.md section 8): questions + annotations JSON, soft-score classifier, official accuracy.

Files: ``{"questions": [{question_id, image_id, question}]}`` and ``{"annotations": [{question_id,
image_id, answers: [{answer}] * 10, multiple_choice_answer}]}`` (no annotations for test splits).
The classifier is over an answer vocabulary (e.g. the 3,129-answer trainval_ans2label.json, or built
from the train annotations); targets are the official soft scores min(1, #humans / 3) averaged over
the 10 leave-one-out subsets; BCE loss. Accuracy uses the official evaluator's answer normalisation
(``processPunctuation`` + ``processDigitArticle`` of vqaEval.py) and, per question, the mean over
the 10 leave-one-out subsets of 9 human answers of ``min(1, #matches / 3)``. Predictions: the
official results file ``[{"question_id": int, "answer": str}]``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from muvla.corpus.region_store import RegionStore
from muvla.model import Model, ModelConfig
from muvla.model.modeling import EncoderOutput
from muvla.tasks.batch import TaskBatch, TaskItem, get_regions
from muvla.tasks.files import NO_REGIONS, HasRegions, LoadReport, missing_field, read_json
from muvla.tasks.model import MLPHead, TaskModel
from muvla.tasks.spec import (
    DataOptions,
    EvalOptions,
    Evaluation,
    ReadOptions,
    TaskSpec,
    count_metrics,
    predict_dataset,
)
from muvla.tasks.vocab import AnswerVocab
from muvla.utils.shards import atomic_file

OUT_OF_VOCAB = "answer outside vocabulary"


@dataclass
class VQAExample:
    question_id: int
    image_id: int
    question: str
    answers: list[str]  # the raw human answers (10 in VQA v2; empty for test questions)
    targets: dict[int, float]  # label id -> soft score (leave-one-out min(1, count/3))


# --------------------------------------------------------------------------------------------
# answer normalisation (official vqaEval.py)
# --------------------------------------------------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")  # fmt: skip
# The official lookbehind is mistyped as a lookahead "(?!<=\d)", so it never blocks anything: a
# period is removed unless a digit follows it ("3.5" keeps it, "dog." loses it). Kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official code passes re.UNICODE (= 32) as the positional `count` of re.sub: at most 32
# periods are removed. Reproduced so scores match the official evaluator to the last digit.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop punctuation that touches a space (or when the text holds a
    digit-comma-digit number), otherwise turn it into a space; then strip periods not before a digit."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles, add apostrophes."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Full official normalisation: whitespace clean-up, punctuation, then digits/articles/contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


# --------------------------------------------------------------------------------------------
# targets and the answer vocabulary
# --------------------------------------------------------------------------------------------


def vqa_soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Official soft score per (normalised) answer: mean over the leave-one-out subsets of
    min(1, count_in_subset / 3). With 10 humans: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0."""
    norm = [normalize_vqa_answer(a) for a in answers]
    counts = Counter(norm)
    n = len(norm)
    if n == 0:
        return {}
    if n == 1:
        return {norm[0]: 1.0 / 3.0}
    # c subsets lose one copy (c - 1 left), n - c subsets keep all c copies
    return {a: (c * min(1.0, (c - 1) / 3.0) + (n - c) * min(1.0, c / 3.0)) / n for a, c in counts.items()}


def build_answer_vocab(annotations: Iterable[dict] | str | Path, min_count: int = 9) -> AnswerVocab:
    """Vocabulary of normalised ``multiple_choice_answer``s given by >= min_count questions
    (the bottom-up-attention recipe that yields the 3,129 answers); most frequent first."""
    if isinstance(annotations, str | Path):
        annotations = read_json(annotations).get("annotations", [])
    counts: Counter = Counter()
    for ann in annotations:
        if not isinstance(ann, dict):
            raise ValueError(f"build_answer_vocab: annotation {ann!r} is not an object")
        mc = ann.get("multiple_choice_answer")
        if mc is None:  # fall back to the most common human answer
            human = [a["answer"] for a in ann.get("answers", []) if isinstance(a, dict) and "answer" in a]
            if not human:
                continue
            mc = Counter(normalize_vqa_answer(a) for a in human).most_common(1)[0][0]
        counts[normalize_vqa_answer(mc)] += 1
    answers = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if not answers:
        raise ValueError(f"build_answer_vocab: no answer occurs >= {min_count} times")
    return AnswerVocab(answers)


def vocab_from_train_files(files: Sequence[Path], min_count: int) -> AnswerVocab:
    """The spec's vocabulary builder: from the train annotations (the second train file)."""
    return build_answer_vocab(files[1], min_count)


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------


def _read_annotations(path: str | Path, report: LoadReport) -> dict[int, dict]:
    """question_id -> annotation; malformed annotations are recorded and left out."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected a VQA annotations file {{'annotations': [...]}}")
    anns: dict[int, dict] = {}
    for i, a in enumerate(data["annotations"]):
        bad = missing_field(a, ("question_id", "answers"), ("question_id",)) if isinstance(a, dict) else "not an object"
        if bad is None and (not isinstance(a["answers"], list) or not a["answers"] or not all(
                isinstance(x, dict) and isinstance(x.get("answer"), str) for x in a["answers"])):
            bad = "'answers' must be a non-empty list of {'answer': str}"
        if bad:
            report.skip(path, i, f"malformed annotation: {bad}")
            continue
        anns[int(a["question_id"])] = a
    return anns


def _targets(answers: Sequence[str], vocab: AnswerVocab, report: LoadReport) -> dict[int, float]:
    """label -> soft score; answers outside the vocabulary are noted and dropped."""
    targets: dict[int, float] = {}
    for ans, score in vqa_soft_scores(answers).items():
        label = vocab.label(ans)
        if label is None:
            report.note(OUT_OF_VOCAB)  # once per (question, distinct normalised answer)
            continue
        targets[label] = score
    if answers and not targets:
        report.note("no answer in vocabulary")
    return targets


def load_vqa(questions_json: str | Path, annotations_json: str | Path | None, answer_vocab: AnswerVocab,
             has_regions: HasRegions | None = None) -> tuple[list[VQAExample], LoadReport]:
    """VQA v2 questions (+ annotations when given; test splits have none).

    Skipped with a record: malformed question, duplicate question_id, question without an
    annotation (when annotations are given), image without regions. Noted only: answers outside
    the vocabulary (dropped from targets), questions with no answer in the vocabulary (kept, empty
    targets: they still count in the accuracy).
    """
    report = LoadReport()
    questions = read_json(questions_json)
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"{questions_json}: expected a VQA questions file {{'questions': [...]}}")
    anns = _read_annotations(annotations_json, report) if annotations_json is not None else None
    examples: list[VQAExample] = []
    seen: set[int] = set()
    for i, q in enumerate(questions["questions"]):
        bad = (missing_field(q, ("question_id", "image_id", "question"), ("question_id", "image_id"))
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
        if anns is not None:
            if qid not in anns:
                report.skip(questions_json, i, "question has no annotation", key)
                continue
            answers = [a["answer"] for a in anns[qid]["answers"]]
        targets = _targets(answers, answer_vocab, report)
        examples.append(VQAExample(qid, int(q["image_id"]), str(q["question"]), answers, targets))
    report.kept = len(examples)
    return examples, report


def read_vqa(files: Sequence[Path], options: ReadOptions) -> tuple[list[VQAExample], LoadReport]:
    """The spec's reader: [questions.json] or [questions.json, annotations.json]."""
    if options.vocab is None:
        raise ValueError("vqa needs an answer vocabulary (answer_vocab)")
    return load_vqa(files[0], files[1] if len(files) == 2 else None, options.vocab, options.has_regions)


# --------------------------------------------------------------------------------------------
# dataset and head
# --------------------------------------------------------------------------------------------


class VQADataset(Dataset):
    """(question, image) -> soft-score target vector over the answer vocabulary."""

    def __init__(self, examples: Sequence[VQAExample], store: RegionStore, n_answers: int) -> None:
        self.examples = list(examples)
        self.store = store
        self.n_answers = n_answers

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.examples[i]
        target = torch.zeros(self.n_answers, dtype=torch.float32)
        for label, score in ex.targets.items():
            target[label] = score
        return TaskItem([ex.question], [get_regions(self.store, ex.image_id)], target, ex.question_id)


def vqa_dataset(examples: Sequence[VQAExample], store: RegionStore, options: DataOptions) -> VQADataset:
    return VQADataset(examples, store, options.n_answers)


class VQAHead(MLPHead):
    """MLP on the pooled [CLS] -> n_answers logits. BCE-with-logits on the soft scores, mean over
    (batch, answers) then multiplied by n_answers (= summed over answers, mean over questions), as
    the reference code does, so the gradient does not shrink with a 3,129-way output."""

    def __init__(self, config: ModelConfig, n_answers: int, dropout: float) -> None:
        if n_answers < 1:
            raise ValueError("the VQA head needs n_answers >= 1 (the answer vocabulary size)")
        h = config.hidden_size
        super().__init__(h, 2 * h, n_answers, dropout, config.layer_norm_eps)

    def logits(self, out: EncoderOutput, batch: TaskBatch, encoder: Model) -> torch.Tensor:
        return self(out.pooled)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]

    def train_logs(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


# --------------------------------------------------------------------------------------------
# official accuracy, evaluation, predictions
# --------------------------------------------------------------------------------------------


def vqa_question_accuracy(prediction: str, gt_answers: Sequence[str], official_guard: bool = True) -> float:
    """Accuracy of one answer against the raw human answers (normally 10).

    Mean over the leave-one-out subsets (each human left out once) of min(1, #matches / 3). With
    ``official_guard`` the official quirk is kept: answers are normalised only when the humans
    disagree (``len(set(gt)) > 1``); otherwise prediction and answers are compared after
    whitespace clean-up only (VQA's unanimous answers are already normalised in the files).
    """
    if len(gt_answers) == 0:
        raise ValueError("a VQA question needs at least one human answer to be scored")
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    if not official_guard or len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    if len(gts) == 1:  # no leave-one-out possible: plain min(1, matches/3)
        return min(1.0, float(gts[0] == pred) / 3.0)
    matches = [g == pred for g in gts]
    total = sum(matches)
    # leaving out human i leaves `total - matches[i]` matching answers among the others
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def vqa_accuracy(predictions: Mapping[int, str], examples: Sequence[VQAExample],
                 official_guard: bool = True) -> float:
    """Official VQA accuracy (fraction in [0, 1]) over ``examples``.

    Every example needs a prediction (the official evaluator refuses incomplete results); extra
    predictions are ignored so a subset can be scored from a full-split prediction file.
    """
    if not examples:
        raise ValueError("vqa_accuracy: no examples to score")
    missing = [ex.question_id for ex in examples if ex.question_id not in predictions]
    if missing:
        raise ValueError(f"vqa_accuracy: {len(missing)} of {len(examples)} questions have no prediction "
                         f"(first: {missing[:5]})")
    scores = [vqa_question_accuracy(predictions[ex.question_id], ex.answers, official_guard) for ex in examples]
    return float(np.mean(scores))


def evaluate_vqa(model: TaskModel, examples: Sequence[VQAExample], report: LoadReport,
                 options: EvalOptions) -> Evaluation:
    """Answers for every question; accuracy only when the split has annotations (not test-dev)."""
    if options.vocab is None:
        raise ValueError("VQA evaluation needs the answer vocabulary")
    dataset = VQADataset(examples, options.store, model.n_answers)
    keys, preds, _ = predict_dataset(model, dataset, options)
    predictions = {int(k): options.vocab.answer(int(p)) for k, p in zip(keys, preds)}
    metrics = count_metrics(examples, report)
    if all(ex.answers for ex in examples):
        metrics["accuracy"] = vqa_accuracy(predictions, examples)
    return Evaluation(metrics, predictions)


def write_vqa_predictions(path: str | Path, predictions: Mapping[int, str]) -> Path:
    """Official VQA results file: [{"question_id": int, "answer": str}, ...] sorted by question id."""
    rows = [{"question_id": int(q), "answer": str(a)} for q, a in sorted(predictions.items(), key=lambda x: int(x[0]))]
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows), encoding="utf-8")
    return path


VQA = TaskSpec(
    name="vqa", display="VQA", headline="accuracy", aliases=("vqav2", "vqa_v2"),
    files="questions.json annotations.json", n_files=(1, 2), n_labelled_files=(2,),
    read=read_vqa, dataset=vqa_dataset, head=VQAHead, evaluate=evaluate_vqa,
    write_predictions=write_vqa_predictions, prediction_suffix=".json",
    build_answer_vocab=vocab_from_train_files,
)
