"""Detector class names -> the words a caption would use for them.

Why: retrieval matches tag queries against captions, and the region-tag task predicts tags as text;
"dining_table", "sports ball" or "hair drier" are detector jargon that captions almost never say
("table", "ball", "hair dryer"). For every class we consider its own name and a few known synonyms
(``SYNONYMS``; never hypernyms or hyponyms: "person" is not rewritten as "man"), and keep the form a
caption corpus uses most. Forms are counted as whole words, longest form first, singular and plural
together, so "cell phone" is not also counted as "phone".

The COCO-80 choice shipped in ``COCO_CAPTION_WORDS`` was counted on the COCO val2017 caption pool;
``python -m muvla.regions.tags --captions FILE... --classes coco`` recounts it on any corpus and
writes a JSON mapping that the detector backends accept as ``tag_words``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from muvla.corpus.captions import read_captions_file

# The 80 COCO detection classes in the contiguous order detectors trained on COCO output them.
COCO80_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

# Same-meaning names a caption may use instead of the class name (first = the class name itself).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "tv": ("tv", "television"),
    "tvmonitor": ("tvmonitor", "tv", "television"),
    "couch": ("couch", "sofa"),
    "sofa": ("sofa", "couch"),
    "cell phone": ("cell phone", "cellphone", "phone", "mobile phone"),
    "sports ball": ("sports ball", "ball"),
    "dining table": ("dining table", "table"),
    "diningtable": ("diningtable", "dining table", "table"),
    "hair drier": ("hair drier", "hair dryer", "blow dryer"),
    "potted plant": ("potted plant", "plant", "houseplant"),
    "pottedplant": ("pottedplant", "potted plant", "plant"),
    "motorcycle": ("motorcycle", "motorbike"),
    "motorbike": ("motorbike", "motorcycle"),
    "airplane": ("airplane", "plane", "aeroplane"),
    "aeroplane": ("aeroplane", "airplane", "plane"),
    "donut": ("donut", "doughnut"),
    "remote": ("remote", "remote control"),
    "wine glass": ("wine glass", "glass"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "teddy bear": ("teddy bear", "stuffed animal"),
    "refrigerator": ("refrigerator", "fridge"),
    "hot dog": ("hot dog", "hotdog"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "handbag": ("handbag", "purse", "bag"),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),
    "baseball bat": ("baseball bat", "bat"),
    "suitcase": ("suitcase", "luggage"),
    "bicycle": ("bicycle", "bike"),
    "traffic light": ("traffic light", "stop light"),
    "cup": ("cup", "mug"),
    "laptop": ("laptop", "laptop computer"),
}

# Counted on the COCO val2017 caption pool (24,219 captions) with `choose_caption_words`; only the
# classes whose chosen word differs from the (cleaned) class name are listed.
COCO_CAPTION_WORDS: dict[str, str] = {
    "bicycle": "bike",
    "handbag": "bag",
    "suitcase": "luggage",
    "sports ball": "ball",
    "baseball bat": "bat",
    "baseball glove": "glove",
    "wine glass": "glass",
    "potted plant": "plant",
    "dining table": "table",
    "hair drier": "hair dryer",
}

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Enough English plural rules to count "dogs" as "dog" (the regions stage may not import the retrieval stage).
IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
                     "foot": "feet", "tooth": "teeth", "goose": "geese", "knife": "knives", "leaf": "leaves",
                     "shelf": "shelves", "wolf": "wolves", "scarf": "scarves", "calf": "calves"}
UNCHANGED_PLURALS = {"sheep", "deer", "fish", "moose", "aircraft", "glasses", "jeans", "pants", "shorts",
                     "scissors", "people", "police", "clothes", "skis", "sunglasses", "eyeglasses"}


def pluralise(noun: str) -> str:
    """English plural of the last word ("tennis racket" -> "tennis rackets")."""
    head, _, last = noun.rpartition(" ")
    if last in UNCHANGED_PLURALS:
        plural = last
    elif last in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def clean_name(name: str) -> str:
    """Lowercase, underscores/slashes as spaces, no bracketed notes: "Dining_Table (indoor)" -> "dining table"."""
    text = re.sub(r"\(.*?\)", " ", str(name).lower())
    text = re.sub(r"[_/]+", " ", text)
    return " ".join(text.split())


_SINGULARS = {plural: single for single, plural in IRREGULAR_PLURALS.items()}


def singularise(noun: str) -> str:
    """Inverse of ``pluralise`` for the last word ("tennis rackets" -> "tennis racket"); unknown forms stay."""
    head, _, last = noun.rpartition(" ")
    if last in UNCHANGED_PLURALS or len(last) < 4:
        single = last
    elif last in _SINGULARS:
        single = _SINGULARS[last]
    elif last.endswith("ies"):
        single = last[:-3] + "y"
    elif last.endswith(("ches", "shes", "sses", "xes", "zes")):
        single = last[:-2]
    elif last.endswith("s") and not last.endswith(("ss", "us", "is")):
        single = last[:-1]
    else:
        single = last
    return f"{head} {single}" if head else single


def candidate_forms(name: str) -> tuple[str, ...]:
    """The cleaned class name, its synonyms, and its singular when the name is a plural."""
    base = clean_name(name)
    forms = list(SYNONYMS.get(base, (base,)))
    single = singularise(base)
    if single != base:
        forms.append(single)
    return tuple(dict.fromkeys(forms))


def count_forms(texts: Iterable[str], forms: Iterable[str]) -> Counter:
    """Whole-word occurrences of each form (its plural included), longest form first, no double counting."""
    variants: dict[tuple[str, ...], str] = {}
    for form in forms:
        for variant in (form, pluralise(form)):
            variants.setdefault(tuple(variant.split()), form)
    by_length = sorted({len(v) for v in variants}, reverse=True)
    counts: Counter = Counter()
    for text in texts:
        words = _WORD.findall(text.lower())
        used = [False] * len(words)
        for n in by_length:
            for i in range(len(words) - n + 1):
                if any(used[i:i + n]):
                    continue
                form = variants.get(tuple(words[i:i + n]))
                if form is not None:
                    counts[form] += 1
                    used[i:i + n] = [True] * n
    return counts


def choose_caption_words(class_names: Iterable[str], texts: list[str]) -> dict[str, str]:
    """Class name -> its most frequent candidate form in ``texts`` (ties and zero counts keep the name)."""
    names = list(class_names)
    forms = {name: candidate_forms(name) for name in names}
    counts = count_forms(texts, {f for fs in forms.values() for f in fs})
    chosen = {}
    for name in names:
        best = max(forms[name], key=lambda f: (counts[f], f == forms[name][0]))
        chosen[name] = best
    return chosen


def caption_word(name: str, table: dict[str, str] | None = None) -> str:
    """The tag stored for a detector class: the table's choice, else the cleaned name."""
    table = COCO_CAPTION_WORDS if table is None else table
    base = clean_name(name)
    return table.get(name, table.get(base, base))


def load_tag_words(path: Path | None) -> dict[str, str] | None:
    """A JSON object {class name: caption word}; None keeps the shipped COCO table."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"tag_words file {path} is not a readable JSON object ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"tag_words file {path} must map class names to words (a JSON object of strings)")
    return data


def _read_captions(path: Path) -> list[str]:
    """Captions from a COCO captions JSON or a plain text file (one caption per line)."""
    if path.suffix == ".json":
        return [c.text for c in read_captions_file(path).captions() if c.text is not None]
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muvla.regions.tags", description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=Path, nargs="+", required=True,
                        help="COCO captions JSON or text files, one caption per line")
    parser.add_argument("--classes", default="coco", help="'coco' or a text file with one class name per line")
    parser.add_argument("--out", type=Path, default=None, help="write the changed names as JSON here")
    args = parser.parse_args(argv)
    try:
        texts = [t for p in args.captions for t in _read_captions(p)]
        names = list(COCO80_NAMES) if args.classes == "coco" else [
            line.strip() for line in Path(args.classes).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, KeyError) as err:
        print(f"muvla: cannot read the inputs: {err}", file=sys.stderr)
        return 1
    forms = {n: candidate_forms(n) for n in names}
    counts = count_forms(texts, {f for fs in forms.values() for f in fs})
    chosen = choose_caption_words(names, texts)
    for name in names:
        if len(forms[name]) > 1:
            detail = ", ".join(f"{f} {counts[f]}" for f in forms[name])
            print(f"{name:>16} -> {chosen[name]:<16} ({detail})")
    changed = {n: w for n, w in chosen.items() if w != clean_name(n)}
    if args.out is not None:
        args.out.write_text(json.dumps(changed, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(changed, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
