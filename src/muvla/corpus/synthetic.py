"""Corpus parts written by hand, in the exact on-disk formats, with their build records.

For smoke runs, tests, benchmarks and users who bring their own pairs:

- ``write_region_store(folder, images)``: a region store from ``ImageRegions`` you computed
  yourself (e.g. a detector we do not ship), usable by retrieval, pre-training and fine-tuning;
- ``write_sentence_store(folder, sentences)``: a text stage output from a list of sentences;
- ``write_synthetic_corpus(folder)``: a whole tiny corpus (regions/, text/, retrieval/, phrases/)
  that is learnable by construction, so ``muvla pretrain --corpus folder`` runs on it.

Each part gets a ``build.json`` like a stage output (stage settings ``{"written_by": ...}``), so
the consistency checks treat it like any other corpus.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from muvla.corpus.layout import (
    CorpusLayout,
    PairMatch,
    PhrasesOutput,
    RegionsOutput,
    RetrievalOutput,
    SentencePhrases,
    TextOutput,
    TopK,
    write_parquet,
)
from muvla.corpus.provenance import BuildRecord, finish_output
from muvla.corpus.region_store import ImageRegions, RegionPartWriter, merge_region_parts

SYNTHETIC_CLASSES = ("dog", "cat", "car", "tree", "boat", "horse")
SYNTHETIC_TEMPLATES = ("a {a} next to a {b}", "the {a} and the {b}", "a photo of a {a} with a {b}")
SYNTHETIC_TEMPLATES_ONE = ("a photo of a {a}", "the {a} in the picture", "there is a {a} here")


def _finish(output: Any, stage: str, settings: dict[str, Any], inputs: dict[str, str] | None = None,
            sources: dict[str, str] | None = None) -> None:
    record = BuildRecord(stage, settings, inputs or {}, sources=sources or {})
    finish_output(Path(output.root), record, output.outputs())


def write_region_store(folder: str | Path, images: Sequence[ImageRegions], classes: Sequence[str] = (),
                       max_regions: int | None = None, images_per_part: int = 64,
                       store_class_probs: bool = False) -> Path:
    """A complete region store (parts, merged index, classes.json, build.json) from ``images``."""
    output = RegionsOutput(Path(folder))
    if not images:
        raise ValueError("write_region_store needs at least one image")
    feature_dim = int(images[0].features.shape[1]) if images[0].num_regions else 1
    r_max = max_regions or max(1, max(im.num_regions for im in images))
    for p, start in enumerate(range(0, len(images), images_per_part)):
        writer = RegionPartWriter(max_regions=r_max, feature_dim=feature_dim, capacity=images_per_part,
                                  num_classes=len(classes), store_class_probs=store_class_probs)
        for image in images[start:start + images_per_part]:
            writer.add(image)
        part = output.parts / f"part-{p:05d}"
        part.mkdir(parents=True, exist_ok=True)
        writer.write(part)
    merge_region_parts(output.root)
    output.write_classes(list(classes))
    _finish(output, "regions", {"written_by": "write_region_store", "max_regions": r_max})
    return output.root


def write_sentence_store(folder: str | Path, sentences: Sequence[str], source: str = "synthetic") -> Path:
    """A complete text stage output (sentence ids = list positions)."""
    output = TextOutput(Path(folder))
    with output.writer() as writer:
        for text in sentences:
            writer.add(text, source)
    _finish(output, "text", {"written_by": "write_sentence_store"})
    return output.root


def write_pairs(folder: str | Path, topk: TopK, regions: RegionsOutput, text: TextOutput, k: int) -> Path:
    """A retrieval-format output from pairs you chose (e.g. your own image-sentence alignment)."""
    output = RetrievalOutput(Path(folder))
    output.write_topk(topk)
    _finish(output, "retrieval", {"written_by": "write_pairs", "k": k},
            {"regions": regions.digest(), "text": text.digest()},
            {"regions": str(regions.root), "text": str(text.root)})
    return output.root


def write_phrases(folder: str | Path, phrases: Sequence[tuple[int, SentencePhrases]], matches: Sequence[PairMatch],
                  retrieval: RetrievalOutput, regions: RegionsOutput, text: TextOutput) -> Path:
    """A phrases-stage output from noun phrases and region-phrase matches you computed."""
    output = PhrasesOutput(Path(folder))
    write_parquet(output.sentence_phrases, PhrasesOutput.phrases_table(phrases))
    write_parquet(output.matches, PhrasesOutput.matches_table(matches))
    _finish(output, "phrases", {"written_by": "write_phrases"},
            {"retrieval": retrieval.digest(), "regions": regions.digest(), "text": text.digest()},
            {"retrieval": str(retrieval.root), "regions": str(regions.root), "text": str(text.root)})
    return output.root


def _phrase_spans(text: str, names: Sequence[str], tokenizer: Any) -> SentencePhrases:
    """The noun chunk ending at each class name ("a dog", "the dog"), with char and WordPiece spans."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    row = SentencePhrases([], [], [])
    for name in names:
        end = text.index(name) + len(name)
        start = max(text.rfind(" ", 0, text.index(name) - 1) + 1, 0)
        hit = [j for j, (s, e) in enumerate(offsets) if s < end and e > start]
        row.phrases.append(text[start:end])
        row.char_spans.append([start, end])
        row.token_spans.append([hit[0], hit[-1] + 1])
    return row


def write_synthetic_corpus(out: str | Path, num_images: int = 24, feature_dim: int = 16, regions_per_image: int = 4,
                           classes: Sequence[str] = SYNTHETIC_CLASSES, seed: int = 0,
                           with_class_probs: bool = False, objects_per_image: int = 2) -> Path:
    """Write a tiny corpus in the exact on-disk formats, learnable by construction.

    Each image shows ``objects_per_image`` (1 or 2) object classes; each region's feature is its class
    prototype plus noise and its tag is the class name. Every class set has 3 sentences naming its
    classes; an image's top-K are exactly the sentences of its set (K = 3), so a random negative never
    names all of its objects and ITM is learnable. Phrases are the noun chunks "a dog" etc., matched
    to the regions of that class with similarity 0.9.
    """
    from muvla.encoders import load_wordpiece_tokenizer

    layout = CorpusLayout.at(out)
    rng = np.random.default_rng(seed)
    C = len(classes)
    protos = rng.normal(size=(C, feature_dim)).astype(np.float32)
    if objects_per_image not in (1, 2):
        raise ValueError(f"objects_per_image must be 1 or 2, got {objects_per_image}")
    class_sets = list(itertools.combinations(range(C), objects_per_image))
    templates = SYNTHETIC_TEMPLATES if objects_per_image == 2 else SYNTHETIC_TEMPLATES_ONE

    # sentences: templates x class sets (both orders of mention)
    sentences: list[str] = []
    sent_classes: list[tuple[int, ...]] = []
    for pair in class_sets:
        for t, template in enumerate(templates):
            order = pair if t % 2 == 0 else pair[::-1]
            sentences.append(template.format(a=classes[order[0]], b=classes[order[-1]]))
            sent_classes.append(tuple(order))
    write_sentence_store(layout.text.root, sentences)

    images, image_sets = [], []
    for i in range(num_images):
        pair = class_sets[int(rng.integers(len(class_sets)))]
        image_sets.append(pair)
        cls = np.array(list(pair) + [int(rng.choice(pair)) for _ in range(regions_per_image - len(pair))],
                       dtype=np.int32)
        feats = protos[cls] + 0.3 * rng.normal(size=(regions_per_image, feature_dim)).astype(np.float32)
        x1 = rng.uniform(0, 50, regions_per_image)
        y1 = rng.uniform(0, 50, regions_per_image)
        boxes = np.stack([x1, y1, x1 + rng.uniform(10, 50, regions_per_image),
                          y1 + rng.uniform(10, 50, regions_per_image)], 1).astype(np.float32)
        probs = None
        if with_class_probs:
            probs = np.full((regions_per_image, C), 0.05 / max(C - 1, 1), dtype=np.float32)
            probs[np.arange(regions_per_image), cls] = 0.95
        images.append(ImageRegions(image_id=f"img{i:04d}", file=f"img{i:04d}.jpg", width=100, height=100,
                                   boxes=boxes, tags=[classes[c] for c in cls],
                                   scores=np.ones(regions_per_image, np.float32), class_ids=cls,
                                   features=feats.astype(np.float16), class_probs=probs))
    write_region_store(layout.regions.root, images, classes, max_regions=regions_per_image,
                       images_per_part=max(num_images, 1), store_class_probs=with_class_probs)

    # retrieval: the image's class set's sentences, ranks 0..2
    rows: list[tuple[str, int, int]] = []
    for i, pair in enumerate(image_sets):
        own = [s for s, p in enumerate(sent_classes) if set(p) == set(pair)]
        rows += [(f"img{i:04d}", rank, sid) for rank, sid in enumerate(own)]
    topk = TopK([r[0] for r in rows], np.array([r[1] for r in rows], np.int32), np.array([r[2] for r in rows], np.int64),
                np.array([0.9 - 0.1 * r[1] for r in rows], np.float32))
    k = max(r[1] for r in rows) + 1
    write_pairs(layout.retrieval.root, topk, layout.regions, layout.text, k)

    tok = load_wordpiece_tokenizer("default")
    phrases = [(sid, _phrase_spans(text, [classes[c] for c in sent_classes[sid]], tok))
               for sid, text in enumerate(sentences)]
    by_sid = {sid: list(sent_classes[sid]) for sid in range(len(sentences))}
    matches = []
    for (image_id, rank, sid), image in zip(rows, (images[int(r[0][3:])] for r in rows)):
        owners = by_sid[sid]
        rp = [owners.index(int(c)) if int(c) in owners else -1 for c in image.class_ids]
        matches.append(PairMatch(image_id, rank, sid, rp, [0.9 if p >= 0 else 0.0 for p in rp]))
    write_phrases(layout.phrases.root, phrases, matches, layout.retrieval, layout.regions, layout.text)
    return Path(out)
