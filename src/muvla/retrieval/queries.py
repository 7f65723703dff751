"""Turn an image's region tags into the text query sent to Sentence-BERT.

``official`` reproduces the reference ("objects_no_rep"): de-duplicated tags in first-occurrence
order joined by spaces. It throws multiplicity away ("person person dog" -> "person dog"), while a
caption says "two people and a dog". ``counted`` keeps it, in caption-like English:
"two people, a dog" (most frequent first, ties by first occurrence), and drops generic whole-image
tags (``GENERIC_TAGS``) unless nothing else is left. ``salient`` phrases like ``counted`` but lists
objects biggest first (by each class's largest box): how often a caption names an object grows with
its size, while the most numerous objects are often clutter ("seven bottles, six forks, ...").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

QUERY_MODES = ("official", "counted", "salient")

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}

IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "ox": "oxen", "knife": "knives",
    "leaf": "leaves", "shelf": "shelves", "wolf": "wolves", "loaf": "loaves", "scarf": "scarves",
    "calf": "calves", "half": "halves", "life": "lives", "wife": "wives",
}
# Nouns whose plural is the same word (or that are already mass/plural nouns).
UNCHANGED_PLURALS = {"sheep", "deer", "fish", "moose", "series", "species", "aircraft", "glasses",
                     "jeans", "pants", "shorts", "scissors", "people", "police", "clothes", "skis"}

# Mass nouns take neither an article nor a number ("grass", not "a grass" / "two grasses").
MASS_NOUNS = {"grass", "water", "snow", "sand", "sky", "hair", "broccoli", "food", "rice", "meat", "bread",
              "dirt", "mud", "smoke", "fog", "ice", "furniture", "clothing", "luggage", "foliage"}

# Tags that describe the whole scene rather than an object; they rarely help find the caption.
GENERIC_TAGS = {"background", "image", "photo", "picture", "scene", "view", "day", "outdoors", "indoors",
                "__background__", "unknown"}

_VOWELS = set("aeiou")


def pluralise(noun: str) -> str:
    """English plural of a tag; multi-word tags pluralise their last word ("tennis racket" -> "tennis rackets")."""
    noun = noun.strip()
    if not noun:
        return noun
    head, _, last = noun.rpartition(" ")
    lower = last.lower()
    if lower in UNCHANGED_PLURALS:
        plural = last
    elif lower in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[lower]
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif len(lower) > 1 and lower.endswith("y") and lower[-2] not in _VOWELS:
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def count_phrase(tag: str, count: int) -> str:
    """'a dog', 'an apple', 'two dogs', '13 dogs', 'grass'."""
    if tag.lower() in MASS_NOUNS:
        return tag
    if count == 1:
        article = "an" if tag[:1].lower() in _VOWELS else "a"
        return f"{article} {tag}"
    return f"{NUMBER_WORDS.get(count, str(count))} {pluralise(tag)}"


def _clean_tags(tags: list[str]) -> list[str]:
    return [" ".join(str(t).split()) for t in tags if t is not None and str(t).strip()]


def official_query(tags: list[str]) -> str:
    """Reference query: de-duplicated tags, first-occurrence order, joined by spaces."""
    return " ".join(dict.fromkeys(_clean_tags(tags)))


def counted_query(tags: list[str]) -> str:
    """Counted query: "two dogs, a frisbee, a person" (by count, then first occurrence)."""
    cleaned = _clean_tags(tags)
    specific = [t for t in cleaned if t.lower() not in GENERIC_TAGS]
    cleaned = specific or cleaned
    counts = Counter(cleaned)
    first = {t: i for i, t in reversed(list(enumerate(cleaned)))}
    ordered = sorted(counts, key=lambda t: (-counts[t], first[t]))
    return ", ".join(count_phrase(t, counts[t]) for t in ordered)


def salient_query(tags: list[str], areas: np.ndarray | None = None) -> str:
    """Counted phrases, biggest object class first: "a dining table, four people, two chairs".

    A class ranks by its largest box (area fraction); ties and missing or NaN areas keep first
    occurrence. Generic whole-image tags are dropped as in ``counted``.
    """
    if areas is not None and len(areas) != len(tags):
        raise ValueError(f"salient query: {len(tags)} tags but {len(areas)} areas")
    sizes = np.zeros(len(tags)) if areas is None else np.nan_to_num(np.asarray(areas, dtype=np.float64), nan=0.0)
    pairs = [(" ".join(str(t).split()), float(a)) for t, a in zip(tags, sizes) if t is not None and str(t).strip()]
    specific = [(t, a) for t, a in pairs if t.lower() not in GENERIC_TAGS]
    pairs = specific or pairs
    counts: Counter[str] = Counter(t for t, _ in pairs)
    largest: dict[str, float] = {}
    for t, a in pairs:
        largest[t] = max(largest.get(t, a), a)
    ordered = sorted(largest, key=lambda t: -largest[t])  # stable: ties stay in first-occurrence order
    return ", ".join(count_phrase(t, counts[t]) for t in ordered)


@dataclass
class TaggedImage:
    """One image as the query sees it: region tags with detector scores and box area fractions.

    ``areas`` are box area / image area (NaN when a source has no boxes).
    """

    image_id: str
    tags: list[str]
    scores: np.ndarray  # [n] float32
    areas: np.ndarray  # [n] float32

    def __post_init__(self) -> None:
        if not len(self.tags) == len(self.scores) == len(self.areas):
            raise ValueError(f"image {self.image_id!r}: {len(self.tags)} tags, {len(self.scores)} scores, "
                             f"{len(self.areas)} areas")


def make_query(tags: list[str], mode: str = "official", areas: np.ndarray | None = None) -> str:
    """The query of one image ('' when it has no usable tag; the caller records the skip).

    ``areas`` (box area fractions, one per tag) only matter to ``salient``; without them it keeps
    first-occurrence order.
    """
    if mode == "official":
        return official_query(tags)
    if mode == "counted":
        return counted_query(tags)
    if mode == "salient":
        return salient_query(tags, areas)
    raise ValueError(f"unknown query mode {mode!r}; choose one of {QUERY_MODES}")
