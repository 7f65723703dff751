"""Official downstream metrics and prediction writers (METHOD.md section 8).

All metrics are fractions in [0, 1] (not percentages); the table renders percentages.

- VQA v2: the official evaluator's answer normalisation (``processPunctuation`` +
  ``processDigitArticle`` of vqaEval.py) and accuracy = per question the mean over the 10
  leave-one-out subsets of 9 human answers of ``min(1, #matches / 3)``.
- NLVR2: accuracy and consistency exactly as lil-lab/nlvr ``nlvr2/eval/metrics.py``: a group is
  the identifier with its third part (the image-pair index) blanked, i.e. one sentence written
  for one set; a group is consistent when every example of it is correct.
- SNLI-VE: plain accuracy over the three classes.
- RefCOCO+: a prediction is correct when its box has IoU >= 0.5 with the ground truth; reported
  over ALL expressions (unscored ones count as wrong) and over the expressions whose object some
  region covers (the number the reference code reported).
- Retrieval: recall@1/5/10 image->text and text->image (an image may have several captions).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from muvla.tasks.data import LABELS, NLVR2Example, SNLIVEExample, VQAExample
from muvla.utils.shards import atomic_file

# --------------------------------------------------------------------------------------------
# VQA answer normalisation (official vqaEval.py)
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


# --------------------------------------------------------------------------------------------
# Classification tasks
# --------------------------------------------------------------------------------------------


def accuracy(predictions: Sequence, targets: Sequence) -> float:
    """Fraction of positions where prediction == target."""
    if len(predictions) != len(targets):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(targets)} targets")
    if len(targets) == 0:
        raise ValueError("accuracy: no targets to score")
    return float(np.mean([p == t for p, t in zip(predictions, targets)]))


def nlvr2_group(identifier: str) -> str:
    """Consistency group of an NLVR2 identifier: 'dev-850-2-0' -> 'dev-850--0' (official)."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not 'split-set-pair-sentence'")
    parts[2] = ""
    return "-".join(parts)


def nlvr2_accuracy_consistency(predictions: Mapping[str, bool], examples: Sequence[NLVR2Example]) -> dict:
    """Official NLVR2 accuracy and consistency; returns accuracy, consistency, n, n_groups."""
    if not examples:
        raise ValueError("nlvr2_accuracy_consistency: no examples to score")
    missing = [ex.identifier for ex in examples if ex.identifier not in predictions]
    if missing:
        raise ValueError(f"NLVR2: {len(missing)} of {len(examples)} examples have no prediction "
                         f"(first: {missing[:5]})")
    correct = 0
    groups: dict[str, bool] = {}
    for ex in examples:
        ok = bool(predictions[ex.identifier]) == ex.label
        correct += ok
        key = nlvr2_group(ex.identifier)
        groups[key] = groups.get(key, True) and ok
    return {"accuracy": correct / len(examples), "consistency": sum(groups.values()) / len(groups),
            "n": len(examples), "n_groups": len(groups)}


def snli_ve_accuracy(predictions: Mapping[str, int | str], examples: Sequence[SNLIVEExample]) -> float:
    """SNLI-VE accuracy; a prediction is a label index or one of LABELS."""
    missing = [ex.pair_id for ex in examples if ex.pair_id not in predictions]
    if missing:
        raise ValueError(f"SNLI-VE: {len(missing)} of {len(examples)} pairs have no prediction (first: {missing[:5]})")
    preds = []
    for ex in examples:
        p = predictions[ex.pair_id]
        if isinstance(p, str):
            if p not in LABELS:
                raise ValueError(f"SNLI-VE: prediction {p!r} for {ex.pair_id} is not one of {LABELS}")
            p = LABELS.index(p)
        preds.append(int(p))
    return accuracy(preds, [ex.label for ex in examples])


# --------------------------------------------------------------------------------------------
# RefCOCO+
# --------------------------------------------------------------------------------------------


def box_iou(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> np.ndarray:
    """IoU of boxes x1, y1, x2, y2: [N, 4] x [M, 4] -> [N, M] (single boxes give a scalar array).

    Continuous areas, which equal the refer toolkit's inclusive-pixel computeIoU on xywh boxes
    (x2 = x + w). Boxes with NaN coordinates (no prediction) get IoU 0.
    """
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    single = a_arr.ndim == 1 and b_arr.ndim == 1
    a2 = a_arr.reshape(-1, 4)
    b2 = b_arr.reshape(-1, 4)
    ix1 = np.maximum(a2[:, None, 0], b2[None, :, 0])
    iy1 = np.maximum(a2[:, None, 1], b2[None, :, 1])
    ix2 = np.minimum(a2[:, None, 2], b2[None, :, 2])
    iy2 = np.minimum(a2[:, None, 3], b2[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(a2[:, 2] - a2[:, 0], 0, None) * np.clip(a2[:, 3] - a2[:, 1], 0, None)
    area_b = np.clip(b2[:, 2] - b2[:, 0], 0, None) * np.clip(b2[:, 3] - b2[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    iou = np.nan_to_num(iou, nan=0.0)
    return iou.reshape(()) if single else iou


def covered_by_regions(gt_box: Sequence[float], region_boxes: np.ndarray, threshold: float = 0.5) -> bool:
    """True when some region box has IoU >= threshold with the ground-truth box (so a perfect
    region scorer could get the expression right)."""
    region_boxes = np.asarray(region_boxes, dtype=np.float64).reshape(-1, 4)
    if len(region_boxes) == 0:
        return False
    return bool((box_iou(np.asarray(gt_box)[None], region_boxes) >= threshold).any())


def refcoco_accuracy(pred_boxes: np.ndarray, gt_boxes: np.ndarray, covered_mask: np.ndarray | Sequence[bool],
                     n_unscored: int = 0, threshold: float = 0.5) -> dict:
    """RefCOCO+ accuracy over ALL expressions and over the covered ones.

    ``n_unscored`` counts expressions that have no prediction at all (e.g. their image has no
    regions and the loader skipped them): they count as wrong and uncovered in ``acc_all``.
    A predicted box of NaNs also counts as wrong.
    """
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    covered = np.asarray(covered_mask, dtype=bool).reshape(-1)
    if not len(pred) == len(gt) == len(covered):
        raise ValueError(f"refcoco_accuracy: {len(pred)} predictions, {len(gt)} ground truths, "
                         f"{len(covered)} covered flags")
    if n_unscored < 0:
        raise ValueError("n_unscored must be >= 0")
    n_all = len(gt) + n_unscored
    if n_all == 0:
        raise ValueError("refcoco_accuracy: no expressions to score")
    ious = np.array([box_iou(p, g) for p, g in zip(pred, gt)], dtype=np.float64)
    correct = ious >= threshold
    n_covered = int(covered.sum())
    return {"acc_all": float(correct.sum()) / n_all,
            "acc_covered": float(correct[covered].sum()) / n_covered if n_covered else 0.0,
            "n_all": n_all, "n_covered": n_covered}


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def retrieval_recall(scores: np.ndarray, text_to_image: np.ndarray | Sequence[int],
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@k both directions from a score matrix [n_images, n_texts].

    ``text_to_image[t]`` is the row (image) of text t; an image may own several texts and counts
    as found (image->text) when any of them is in its top k. Ties rank the lower index first (as
    a stable sort would), so results are deterministic. Ranks are counted in row chunks instead
    of sorting, so a 5k x 25k matrix needs no extra full-size copies. Returns i2t_r{k}, t2i_r{k},
    rsum (sum of those, fractions) and mean_recall (their mean).
    """
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    t2i = np.asarray(text_to_image, dtype=np.int64)
    if s.ndim != 2:
        raise ValueError(f"retrieval_recall: scores must be [n_images, n_texts], got shape {s.shape}")
    n_images, n_texts = s.shape
    if t2i.shape != (n_texts,):
        raise ValueError(f"retrieval_recall: text_to_image has {t2i.shape} entries, expected ({n_texts},)")
    if n_texts == 0 or n_images == 0:
        raise ValueError("retrieval_recall: empty score matrix")
    if t2i.min() < 0 or t2i.max() >= n_images:
        raise ValueError(f"retrieval_recall: text_to_image holds rows outside 0..{n_images - 1}")
    if len(np.unique(t2i)) != n_images:
        raise ValueError("retrieval_recall: some image has no text (image->text recall undefined)")
    if np.isnan(s).any():
        raise ValueError("retrieval_recall: scores contain NaN")
    cols = np.arange(n_texts)
    true_score = s[t2i, cols]  # [n_texts] score of each text with its own image
    t2i_rank = np.zeros(n_texts, dtype=np.int64)
    i2t_rank = np.zeros(n_images, dtype=np.int64)
    for start in range(0, n_images, chunk):
        block = s[start:start + chunk]  # [b, n_texts]
        rows = np.arange(start, start + len(block))
        # text -> image: images scoring above the true one, or equal with a lower index
        t2i_rank += (block > true_score).sum(0) + ((block == true_score) & (rows[:, None] < t2i[None, :])).sum(0)
        # image -> text: rank of the image's best own text (first one on ties)
        own = t2i[None, :] == rows[:, None]
        best = np.argmax(np.where(own, block, -np.inf), axis=1)
        best_score = block[np.arange(len(block)), best]
        i2t_rank[rows] = (block > best_score[:, None]).sum(1) + \
            ((block == best_score[:, None]) & (cols[None, :] < best[:, None])).sum(1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    out["rsum"] = float(sum(out.values()))
    out["mean_recall"] = out["rsum"] / (2 * len(ks))
    return out


def meta_ave(metrics: Mapping[str, float]) -> float:
    """Meta-Ave: the plain mean of the reported task metrics (fractions)."""
    if not metrics:
        raise ValueError("meta_ave: no metrics")
    return float(np.mean([float(v) for v in metrics.values()]))


# --------------------------------------------------------------------------------------------
# Prediction files in the benchmarks' submission formats
# --------------------------------------------------------------------------------------------


def write_vqa_predictions(path: str | Path, predictions: Mapping[int, str]) -> Path:
    """Official VQA results file: [{"question_id": int, "answer": str}, ...] sorted by question id."""
    rows = [{"question_id": int(q), "answer": str(a)} for q, a in sorted(predictions.items(), key=lambda x: int(x[0]))]
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_nlvr2_predictions(path: str | Path, predictions: Mapping[str, bool]) -> Path:
    """Official NLVR2 predictions CSV: one ``identifier,True|False`` line per example, no header
    (the official metrics.py treats every line as a prediction)."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        for identifier, pred in sorted(predictions.items()):
            writer.writerow([identifier, "True" if pred else "False"])
    return path


def read_nlvr2_predictions(path: str | Path) -> dict[str, bool]:
    """Read an NLVR2 predictions CSV (``identifier,True|False``)."""
    out: dict[str, bool] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(",")
            if len(parts) < 2 or parts[1].strip().lower() not in ("true", "false"):
                raise ValueError(f"{path}:{lineno}: expected 'identifier,True|False', got {line.strip()!r}")
            out[parts[0]] = parts[1].strip().lower() == "true"
    return out


def write_snli_ve_predictions(path: str | Path, predictions: Mapping[str, int | str]) -> Path:
    """SNLI-VE predictions as JSON lines {"pairID": str, "gold_label": label name} (the annotation
    file's own keys, so a predictions file can be scored like an annotation file)."""
    path = Path(path)
    lines = []
    for pair_id, pred in sorted(predictions.items()):
        label = pred if isinstance(pred, str) else LABELS[int(pred)]
        if label not in LABELS:
            raise ValueError(f"SNLI-VE prediction {pred!r} for {pair_id} is not one of {LABELS}")
        lines.append(json.dumps({"pairID": pair_id, "gold_label": label}))
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def write_refcoco_predictions(path: str | Path, predictions: Mapping[int, Sequence[float]]) -> Path:
    """RefCOCO+ predictions JSON [{"sent_id": int, "box": [x1, y1, x2, y2]}] (the refer toolkit has
    no submission format; keyed by sentence id because each expression is one prediction)."""
    rows = [{"sent_id": int(k), "box": [float(v) for v in box]} for k, box in sorted(predictions.items())]
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows), encoding="utf-8")
    return path
