"""Turn an image's region tags into the text query sent to Sentence-BERT.

``official`` reproduces the reference ("objects_no_rep"): de-duplicated tags in first-occurrence
order joined by spaces. It throws multiplicity away ("person person dog" -> "person dog"), while a
caption says "two people and a dog". ``counted`` keeps it, in caption-like English:
"two people, a dog" (most frequent first, ties by first occurrence), and drops generic whole-image
tags (``GENERIC_TAGS``) unless nothing else is left.
"""

from __future__ import annotations

from collections import Counter

QUERY_MODES = ("official", "counted")

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


def make_query(tags: list[str], mode: str = "official") -> str:
    """The query of one image ('' when it has no usable tag; the caller records the skip)."""
    if mode == "official":
        return official_query(tags)
    if mode == "counted":
        return counted_query(tags)
    raise ValueError(f"unknown query mode {mode!r}; choose one of {QUERY_MODES}")
