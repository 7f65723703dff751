"""A tiny synthetic corpus in the exact on-disk formats, learnable by construction.

For smoke runs, tests and benchmarks: ``write_synthetic_corpus(folder)`` writes regions/, text/,
retrieval/ and phrases/ as the stages would, so ``muvla pretrain --corpus folder`` runs on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muvla.corpus.regions import ImageRegions, RegionPartWriter, RegionStore, merge_region_parts

SYNTHETIC_CLASSES = ("dog", "cat", "car", "tree", "boat", "horse")
SYNTHETIC_TEMPLATES = ("a {a} next to a {b}", "the {a} and the {b}", "a photo of a {a} with a {b}")
SYNTHETIC_TEMPLATES_ONE = ("a photo of a {a}", "the {a} in the picture", "there is a {a} here")


def write_synthetic_corpus(out: str | Path, num_images: int = 24, feature_dim: int = 16, regions_per_image: int = 4,
                           classes: Sequence[str] = SYNTHETIC_CLASSES, seed: int = 0,
                           with_class_probs: bool = False, objects_per_image: int = 2) -> Path:
    """Write a tiny corpus in the exact DESIGN.md formats, learnable by construction.

    Each image shows ``objects_per_image`` (1 or 2) object classes; each region's feature is its class
    prototype plus noise and its tag is the class name. Every class set has 3 sentences naming its
    classes; an image's top-K are exactly the sentences of its set (K = 3), so a random negative never
    names all of its objects and ITM is learnable. Phrases are the noun chunks "a dog" etc., matched
    to the regions of that class with similarity 0.9.
    """
    import itertools

    out = Path(out)
    rng = np.random.default_rng(seed)
    C = len(classes)
    protos = rng.normal(size=(C, feature_dim)).astype(np.float32)
    if objects_per_image not in (1, 2):
        raise ValueError(f"objects_per_image must be 1 or 2, got {objects_per_image}")
    pairs = list(itertools.combinations(range(C), objects_per_image))
    templates = SYNTHETIC_TEMPLATES if objects_per_image == 2 else SYNTHETIC_TEMPLATES_ONE

    # sentences: templates x class pairs (both orders of mention)
    sentences: list[str] = []
    sent_pair: list[tuple[int, ...]] = []
    for pair in pairs:
        for t, template in enumerate(templates):
            order = pair if t % 2 == 0 else pair[::-1]
            sentences.append(template.format(a=classes[order[0]], b=classes[order[-1]]))
            sent_pair.append(tuple(order))
    (out / "text").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sentence_id": pa.array(range(len(sentences)), pa.int64()), "text": sentences,
                             "source": ["synthetic"] * len(sentences)}), out / "text" / "sentences.parquet")

    # regions
    writer = RegionPartWriter(max_regions=regions_per_image, feature_dim=feature_dim, capacity=num_images,
                              num_classes=C, store_class_probs=with_class_probs)
    image_pairs = []
    for i in range(num_images):
        pair = pairs[int(rng.integers(len(pairs)))]
        image_pairs.append(pair)
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
        writer.add(ImageRegions(image_id=f"img{i:04d}", file=f"img{i:04d}.jpg", width=100, height=100, boxes=boxes,
                                tags=[classes[c] for c in cls], scores=np.ones(regions_per_image, np.float32),
                                class_ids=cls, features=feats.astype(np.float16), class_probs=probs))
    part = out / "regions" / "parts" / "part-00000"
    part.mkdir(parents=True, exist_ok=True)
    writer.write(part)
    merge_region_parts(out / "regions")
    (out / "regions" / "classes.json").write_text(json.dumps({"names": list(classes)}), encoding="utf-8")

    # retrieval: the image's pair's sentences, ranks 0..2
    rows = []
    for i, pair in enumerate(image_pairs):
        own = [s for s, p in enumerate(sent_pair) if set(p) == set(pair)]
        for rank, sid in enumerate(own):
            rows.append({"image_id": f"img{i:04d}", "rank": rank, "sentence_id": sid, "score": 0.9 - 0.1 * rank})
    (out / "retrieval").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("image_id", pa.string()), ("rank", pa.int32()),
                                                                ("sentence_id", pa.int64()), ("score", pa.float32())])),
                   out / "retrieval" / "topk.parquet")

    # phrases: "a dog" / "the dog" noun chunks with char and WordPiece spans (class names are one piece)
    from muvla.encoders import load_wordpiece_tokenizer

    tok = load_wordpiece_tokenizer("default")
    phrase_rows = []
    phrase_classes: dict[int, list[int]] = {}
    for sid, text in enumerate(sentences):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        chunks, chars, spans, owners = [], [], [], []
        for c in sent_pair[sid]:
            name = classes[c]
            end = text.index(name) + len(name)
            start = max(text.rfind(" ", 0, text.index(name) - 1) + 1, 0)
            hit = [j for j, (s, e) in enumerate(offsets) if s < end and e > start]
            chunks.append(text[start:end])
            chars.append([start, end])
            spans.append([hit[0], hit[-1] + 1])
            owners.append(c)
        phrase_classes[sid] = owners
        phrase_rows.append({"sentence_id": sid, "phrases": chunks, "char_spans": chars, "token_spans": spans})
    (out / "phrases").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(phrase_rows, schema=pa.schema([
        ("sentence_id", pa.int64()), ("phrases", pa.list_(pa.string())),
        ("char_spans", pa.list_(pa.list_(pa.int32(), 2))), ("token_spans", pa.list_(pa.list_(pa.int32(), 2)))])),
        out / "phrases" / "sentence_phrases.parquet")
    store = RegionStore(out / "regions")
    match_rows = []
    for row in rows:
        reg = store[row["image_id"]]
        owners = phrase_classes[row["sentence_id"]]
        rp = [owners.index(int(c)) if int(c) in owners else -1 for c in reg.class_ids]
        match_rows.append({"image_id": row["image_id"], "rank": row["rank"], "sentence_id": row["sentence_id"],
                           "region_phrase": rp, "region_sim": [0.9 if p >= 0 else 0.0 for p in rp]})
    pq.write_table(pa.Table.from_pylist(match_rows, schema=pa.schema([
        ("image_id", pa.string()), ("rank", pa.int32()), ("sentence_id", pa.int64()),
        ("region_phrase", pa.list_(pa.int32())), ("region_sim", pa.list_(pa.float32()))])),
        out / "phrases" / "matches.parquet")
    return out
