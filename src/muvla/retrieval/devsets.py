"""Development sets for own-caption retrieval: images with tags whose own captions hide in a pool.

A development set answers "does this query mode find an image's own caption among many others?".
80 coco-mini images cannot separate two modes (one image = 0.0125 of recall), so besides the real
images (oracle COCO boxes, or any region store) there is a *caption simulation*: every image of the
caption pool with five captions becomes a query, its tags derived from four of its captions (nouns
mapped to the COCO-80 detector vocabulary, counts kept) and the fifth held out as the caption to
find. Those four captions are excluded from that image's ranking, since its tags were read off them.

Simulated tags are easier than real ones (captions name what is salient, a detector tags whatever it
sees), so a simulation only earns trust when it ranks query modes the way the real images do.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muvla.corpus.captions import normalise_caption, read_captions_file
from muvla.retrieval.queries import TaggedImage, pluralise

# COCO-80 class -> nouns a caption uses for it (singular; plurals are derived). Chosen by reading
# COCO captions: people are "men", "players", "skiers"; a dining table is a "table".
COCO_CLASS_NOUNS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "man", "woman", "men", "women", "boy", "girl", "child", "children", "kid",
               "guy", "lady", "player", "skier", "surfer", "skateboarder", "snowboarder", "rider", "baby",
               "toddler", "adult", "teenager", "crowd", "batter", "catcher", "pitcher", "umpire",
               "chef", "cook", "officer", "gentleman", "female", "male", "biker", "cyclist", "tourist",
               "student", "family", "friend", "worker", "soldier", "passenger", "pedestrian", "spectator"),
    "bicycle": ("bicycle", "bike", "cycle"),
    "car": ("car", "taxi", "cab", "suv", "sedan", "van", "jeep"),
    "motorcycle": ("motorcycle", "motorbike", "scooter", "moped", "motor bike"),
    "airplane": ("airplane", "plane", "jet", "airliner", "aircraft", "jetliner", "air plane"),
    "bus": ("bus",),
    "train": ("train", "locomotive", "tram", "trolley", "subway"),
    "truck": ("truck", "pickup", "lorry"),
    "boat": ("boat", "ship", "sailboat", "canoe", "kayak", "yacht", "ferry"),
    "traffic light": ("traffic light", "stop light", "stoplight", "traffic signal"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench",),
    "bird": ("bird", "seagull", "gull", "pigeon", "duck", "goose", "parrot", "owl", "swan", "chicken"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup"),
    "horse": ("horse", "pony", "foal"),
    "sheep": ("sheep", "lamb", "ram"),
    "cow": ("cow", "cattle", "bull", "calf", "ox"),
    "elephant": ("elephant",),
    "bear": ("bear",),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "back pack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "hand bag"),
    "tie": ("tie", "necktie"),
    "suitcase": ("suitcase", "luggage", "suit case"),
    "frisbee": ("frisbee", "frisbe"),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard", "snow board"),
    "sports ball": ("ball", "soccer ball", "tennis ball", "basketball", "volleyball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard", "skate board"),
    "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup", "mug"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "sub"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake"),
    "chair": ("chair", "stool"),
    "couch": ("couch", "sofa", "loveseat"),
    "potted plant": ("potted plant", "plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table"),
    "toilet": ("toilet",),
    "tv": ("tv", "television", "tv set"),
    "laptop": ("laptop", "notebook computer"),
    "mouse": ("computer mouse", "mouse"),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "phone", "cellphone", "smartphone", "smart phone", "mobile phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy", "stuffed bear"),
    "hair drier": ("hair drier", "hair dryer", "blow dryer"),
    "toothbrush": ("toothbrush", "tooth brush"),
}
# Nouns that name a group of one class: "a crowd" is several people, not one.
GROUP_NOUNS = {"people", "men", "women", "children", "crowd", "family", "cattle"}
COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "lone": 1, "two": 2, "pair": 2, "both": 2, "couple": 2,
               "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
               "several": 3, "many": 3, "few": 3, "group": 3, "bunch": 3, "lots": 3, "herd": 3, "flock": 3}
_WORD = re.compile(r"[a-z]+|\d+")


@dataclass
class DevSet:
    """Query images, the sentence pool they search, and per image which pool rows are its own captions.

    ``excluded[i]``: pool rows image i must never be ranked on (the simulation's tag sources).
    """

    name: str
    images: list[TaggedImage]
    sentences: list[str]
    relevant: list[np.ndarray]
    excluded: list[np.ndarray]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.relevant) == len(self.excluded):
            raise ValueError(f"{self.name}: {len(self.images)} images, {len(self.relevant)} relevant lists, "
                             f"{len(self.excluded)} excluded lists")

    def subset(self, rows: np.ndarray, name: str) -> DevSet:
        """The same pool with only the images at ``rows`` (for select / confirm splits)."""
        return DevSet(name, [self.images[i] for i in rows], self.sentences, [self.relevant[i] for i in rows],
                      [self.excluded[i] for i in rows])

    def split(self, confirm_fraction: float, seed: int = 0) -> tuple[DevSet, DevSet]:
        """(selection part, confirmation part): choose on one, report the choice on the other."""
        order = np.random.default_rng(seed).permutation(len(self.images))
        n_confirm = int(round(confirm_fraction * len(order)))
        return (self.subset(np.sort(order[n_confirm:]), f"{self.name}-select"),
                self.subset(np.sort(order[:n_confirm]), f"{self.name}-confirm"))


class NounLexicon:
    """Finds detector classes named in a caption, longest phrase first, with how many are meant."""

    def __init__(self, class_nouns: dict[str, tuple[str, ...]] | None = None):
        class_nouns = COCO_CLASS_NOUNS if class_nouns is None else class_nouns
        self.forms: dict[tuple[str, ...], tuple[str, bool]] = {}  # word tuple -> (class, is plural)
        for cls, nouns in class_nouns.items():
            for noun in nouns:
                singular = tuple(noun.split())
                plural = tuple(pluralise(noun).split())
                if plural != singular:
                    self.forms.setdefault(plural, (cls, True))
                self.forms.setdefault(singular, (cls, noun in GROUP_NOUNS))
        self.longest = max(len(f) for f in self.forms)

    def mentions(self, caption: str) -> Counter[str]:
        """class -> count named in one caption ("two dogs and a man" -> dog 2, person 1); plurals mean 2."""
        words = _WORD.findall(caption.lower())
        counts: Counter[str] = Counter()
        i = 0
        while i < len(words):
            for size in range(min(self.longest, len(words) - i), 0, -1):
                found = self.forms.get(tuple(words[i:i + size]))
                if found is None:
                    continue
                cls, plural = found
                counts[cls] = max(counts[cls], _count_before(words, i, plural))
                i += size
                break
            else:
                i += 1
        return counts


def _count_before(words: list[str], i: int, plural: bool) -> int:
    """The number a noun phrase states ("three", "a group of", "a pair of"), else 2 for a plural, 1 otherwise."""
    for back in range(1, 4):
        if i - back < 0:
            break
        word = words[i - back]
        if word.isdigit():
            return max(1, min(int(word), 12))
        if word in COUNT_WORDS and not (word in ("a", "an") and plural):
            return COUNT_WORDS[word]
    return 2 if plural else 1


def tags_from_captions(captions: list[str], lexicon: NounLexicon, rng: np.random.Generator) -> list[str]:
    """Simulated region tags: every class any caption names, as many times as the most any caption says.

    Tags are shuffled: captions name salient objects first, a detector lists regions in no such order.
    """
    counts: Counter[str] = Counter()
    for caption in captions:
        for cls, n in lexicon.mentions(caption).items():
            counts[cls] = max(counts[cls], n)
    tags = [cls for cls, n in counts.items() for _ in range(n)]
    return [tags[i] for i in rng.permutation(len(tags))]


class SentencePool:
    """De-duplicated sentences in insertion order (the text stage's rule: identical normalised text = one,
    ``normalise_caption``, so captions match the pool as they match a sentence store)."""

    def __init__(self) -> None:
        self.sentences: list[str] = []
        self.row: dict[str, int] = {}

    def add(self, text: str) -> int:
        text = normalise_caption(text)
        if text not in self.row:
            self.row[text] = len(self.sentences)
            self.sentences.append(text)
        return self.row[text]


def pool_sentences(pool_json: Path) -> SentencePool:
    pool = SentencePool()
    for texts in read_captions_file(pool_json).texts_by_image().values():
        for text in texts:
            pool.add(text)
    return pool


def hidden_caption_devset(name: str, images: list[TaggedImage], captions_json: Path, pool_json: Path) -> DevSet:
    """Real images whose own captions (``captions_json``, matched by file stem) are hidden in the pool."""
    pool = pool_sentences(pool_json)
    own = {stem: sorted({pool.add(t) for t in texts})
           for stem, texts in read_captions_file(captions_json).texts_by_stem().items()}
    kept = [im for im in images if own.get(im.image_id)]
    if not kept:
        raise ValueError(f"{name}: no image of the region store has a caption in {captions_json}")
    return DevSet(name, kept, pool.sentences, [np.asarray(own[im.image_id], np.int64) for im in kept],
                  [np.zeros(0, np.int64) for _ in kept])


def caption_simulation_devset(pool_json: Path, seed: int = 0, lexicon: NounLexicon | None = None,
                              name: str = "coco-pool-simulation") -> DevSet:
    """Every pool image with >= 5 captions: tags from 4 captions, the 5th (chosen at random) is the one to find.

    Images whose four captions name no detector class have no query and are left out.
    """
    lexicon = lexicon or NounLexicon()
    rng = np.random.default_rng(seed)
    pool = pool_sentences(pool_json)
    images: list[TaggedImage] = []
    relevant: list[np.ndarray] = []
    excluded: list[np.ndarray] = []
    captions = read_captions_file(pool_json).texts_by_image()
    for image_id in sorted(captions, key=lambda i: (isinstance(i, str), i)):  # COCO's int ids in number order
        texts = captions[image_id]
        if len(texts) < 5:
            continue
        held_out = int(rng.integers(len(texts)))
        sources = [t for j, t in enumerate(texts) if j != held_out]
        tags = tags_from_captions(sources, lexicon, rng)
        if not tags:
            continue
        target = pool.row[texts[held_out]]
        images.append(TaggedImage(str(image_id), tags, np.ones(len(tags), np.float32),
                                  np.full(len(tags), np.nan, np.float32)))
        relevant.append(np.asarray([target], np.int64))
        excluded.append(np.asarray(sorted({pool.row[t] for t in sources} - {target}), np.int64))
    return DevSet(name, images, pool.sentences, relevant, excluded)
