"""Pre-training data: the weakly-aligned corpus as (image, retrieved sentence) samples (METHOD §2-5).

``PretrainCorpus`` reads a corpus folder (formats in docs/DESIGN.md) once and keeps only what a
sample needs in memory: the retrieved sentences, pre-tokenised (not the whole text store), their
phrase-token maps, and each pair's region-phrase matches. Region features stay memory-mapped in the
``RegionStore``. ``PretrainDataset`` yields one item per usable image; ``PretrainCollator`` pads a
list of items and applies all masking (R-T, R-N, I-S) with a generator seeded from the global torch
RNG, which the trainer re-seeds per batch: the same batch position always gets the same masks, so
a resumed run continues exactly.

Images without regions or without any retrieved sentence are skipped and counted in
``PretrainCorpus.skipped`` (reported in the run summary), never a crash mid-training.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from muvla.corpus.layout import CorpusLayout
from muvla.corpus.region_store import ImageRegions
from muvla.pretraining.masking import mask_is, mask_rn, mask_rt, phrase_targets, sample_itm_negatives
from muvla.utils.config import ConfigError, check_max_text_len

logger = logging.getLogger(__name__)

PMRTC_MAX_PIECES = 8  # WordPieces of a phrase used as p-MRTC targets (longer phrases keep the first ones)
ITM_NEGATIVES = ("corpus", "retrieved")  # where an ITM negative sentence is drawn from
MAX_NEGATIVE_POOL = 200_000  # corpus negatives: a uniform sample this large bounds memory and start-up at CC3M
NEGATIVE_POOL_SEED = 0  # fixed, so every rank and every resume draws from the same pool


# ----------------------------------------------------------------------------------------------
# corpus


class PretrainCorpus:
    """Everything pre-training reads from a corpus folder, indexed by usable image.

    ``corpus``: a corpus folder (``regions/``, ``text/``, ``retrieval/``, ``phrases/``) or a
    :class:`CorpusLayout`; ``retrieval_dir`` / ``phrases_dir`` override the last two (baselines built
    with ``muvla pairs`` keep theirs elsewhere). ``k``: use only ranks < k (the K ablation); None =
    all retrieved ranks. ``max_text_len`` counts [CLS] and [SEP]; the tag sequence of R-T uses the
    same limit. ``max_regions``: keep an image's first regions. ``negatives``: where ITM negatives
    come from: ``corpus`` (METHOD's "random sentence": any sentence of the text store, a uniform
    sample of at most ``MAX_NEGATIVE_POOL``) or ``retrieved`` (only sentences some image retrieved,
    which on a narrow image set are near-positives: every Flickr photo retrieves "a man ..." and
    "a dog ..." sentences, so ITM has nothing to separate). Whether the parts belong together is
    checked by ``CorpusLayout.verify`` (``run_pretrain`` calls it); a retrieved pair without its
    region-phrase match row is refused here too.
    """

    def __init__(self, corpus: str | Path | CorpusLayout, tokenizer: Any, max_text_len: int = 36,
                 max_regions: int = 50, k: int | None = None, retrieval_dir: str | Path | None = None,
                 phrases_dir: str | Path | None = None, negatives: str = "corpus") -> None:
        if negatives not in ITM_NEGATIVES:
            raise ValueError(f"negatives must be one of {ITM_NEGATIVES}, got {negatives!r}")
        check_max_text_len(max_text_len)
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1 (or None for all retrieved ranks), got {k}")
        self.layout = corpus if isinstance(corpus, CorpusLayout) else CorpusLayout.at(corpus, retrieval_dir,
                                                                                      phrases_dir)
        self._check_files()
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.max_regions = max_regions
        self.k = k
        self.negatives = negatives
        self.store = self.layout.regions.store()
        self.feature_dim = self.store.feature_dim
        self.skipped: Counter[str] = Counter()
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.mask_id = int(tokenizer.mask_token_id)
        self.vocab_size = int(len(tokenizer))
        self.special_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        by_image = self._retrieved_pairs()
        self._tokenise_sentences(by_image)
        self._phrase_tokens()
        self._region_matches(by_image)
        self._usable_images(by_image)
        self._negative_pool()
        self.max_k = max((len(s) for s in self.image_sentences), default=0)
        self._tag_cache: dict[str, list[int]] = {}

    def _check_files(self) -> None:
        layout = self.layout
        paths = {"regions index": layout.regions.index, "sentences": layout.text.sentences,
                 "topk": layout.retrieval.topk, "sentence_phrases": layout.phrases.sentence_phrases,
                 "matches": layout.phrases.matches}
        for name, path in paths.items():
            if not path.is_file():
                raise FileNotFoundError(f"pre-training corpus: {name} file {path} not found "
                                        "(build the corpus with `muvla corpus`, or `muvla pairs` + `muvla phrases`)")

    def _retrieved_pairs(self) -> dict[str, list[tuple[int, int]]]:
        """image -> [(rank, sentence id)] of ranks < k, in rank order."""
        pairs = self.layout.retrieval.read_topk().by_image()
        if self.k is None:
            return pairs
        return {image: [(r, s) for r, s in ranked if r < self.k] for image, ranked in pairs.items()}

    def _tokenise_sentences(self, by_image: dict[str, list[tuple[int, int]]]) -> None:
        """[CLS] pieces [SEP] of the retrieved sentences only (not the whole text store)."""
        wanted = sorted({sid for pairs in by_image.values() for _, sid in pairs})
        texts = self.layout.text.texts(wanted)
        missing = [sid for sid in wanted if sid not in texts]
        if missing:
            self.skipped["retrieved_sentence_not_in_text_store"] += len(missing)
            logger.warning("%d retrieved sentence ids are not in %s (e.g. %s); those pairs are skipped",
                           len(missing), self.layout.text.sentences, missing[:3])
        self.sent_tokens = self._tokenise({sid: texts[sid] for sid in wanted if sid in texts})
        empty = len(wanted) - len(missing) - len(self.sent_tokens)
        if empty:
            self.skipped["empty_sentence"] += empty

    def _tokenise(self, texts: dict[int, str]) -> dict[int, np.ndarray]:
        """sentence id -> [CLS] pieces [SEP], truncated to ``max_text_len``; empty sentences left out."""
        ids = self.tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"] if texts else []
        body_len = self.max_text_len - 2
        return {sid: np.array([self.cls_id, *toks[:body_len], self.sep_id], dtype=np.int64)
                for sid, toks in zip(texts, ids) if toks}

    def _negative_pool(self) -> None:
        """``pool`` (sorted sentence ids an ITM negative is drawn from) and ``negative_tokens``.

        A sample's own top-K sentences are excluded when its negative is drawn (the collator).
        """
        if self.negatives == "retrieved":
            self.negative_tokens = {s: self.sent_tokens[s] for sids in self.image_sentences for s in sids}
        else:
            total = self.layout.text.count()
            pool = np.arange(total, dtype=np.int64)
            if total > MAX_NEGATIVE_POOL:
                pool = np.sort(np.random.default_rng(NEGATIVE_POOL_SEED).choice(total, MAX_NEGATIVE_POOL, replace=False))
            new = [int(s) for s in pool if int(s) not in self.sent_tokens]
            self.negative_tokens = {int(s): self.sent_tokens[int(s)] for s in pool if int(s) in self.sent_tokens}
            self.negative_tokens.update(self._tokenise(self.layout.text.texts(new) if new else {}))
        self.pool = np.array(sorted(self.negative_tokens), dtype=np.int64)

    def pool_positions(self, sentence_ids: Sequence[int]) -> np.ndarray:
        """Positions in ``pool`` of these sentence ids (-1 for ids not in the pool)."""
        ids = np.asarray(sentence_ids, dtype=np.int64)
        if len(self.pool) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.searchsorted(self.pool, ids).clip(max=len(self.pool) - 1)
        return np.where(self.pool[pos] == ids, pos, -1)

    def _phrase_tokens(self) -> None:
        """token -> phrase index (shifted by 1 for [CLS]; phrases cut by truncation keep their first pieces)."""
        body_len = self.max_text_len - 2
        self.token_phrase: dict[int, np.ndarray] = {}
        for sid, row in self.layout.phrases.read_phrases(sorted(self.sent_tokens)).items():
            tp = np.full(len(self.sent_tokens[sid]), -1, dtype=np.int64)
            for p, (start, end) in enumerate(row.token_spans):
                start, end = max(int(start), 0), min(int(end), body_len)
                if start < end:
                    tp[1 + start:1 + end] = p
            self.token_phrase[sid] = tp

    def _region_matches(self, by_image: dict[str, list[tuple[int, int]]]) -> None:
        """Region-phrase matches per (image, sentence); a retrieved pair without one is refused."""
        self.matches: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        for m in self.layout.phrases.iter_matches():
            if m.sentence_id in self.sent_tokens:
                self.matches[(m.image_id, m.sentence_id)] = (np.asarray(m.region_phrase, dtype=np.int64),
                                                             np.clip(np.asarray(m.region_sim, np.float32), 0.0, 1.0))
        lost = [(image, sid) for image, pairs in by_image.items() if self.store.num_regions(image) > 0
                for _, sid in pairs if sid in self.sent_tokens and (image, sid) not in self.matches]
        if lost:
            total = sum(len(p) for p in by_image.values())
            raise ConfigError(f"pre-training corpus: {self.layout.phrases.matches} has no row for {len(lost)} of "
                              f"{total} retrieved pairs (e.g. image {lost[0][0]!r}, sentence {lost[0][1]}): the "
                              "phrases and retrieval outputs disagree; rerun `muvla phrases` (or `muvla corpus`)")

    def _usable_images(self, by_image: dict[str, list[tuple[int, int]]]) -> None:
        self.image_ids: list[str] = []
        self.image_sentences: list[list[int]] = []
        self.num_regions: list[int] = []
        for image_id, pairs in by_image.items():
            if image_id not in self.store:
                self.skipped["image_not_in_region_store"] += 1
                continue
            n = self.store.num_regions(image_id)
            if n == 0:
                self.skipped["image_without_regions"] += 1
                continue
            sids = [sid for _, sid in pairs if sid in self.sent_tokens]
            if not sids:
                self.skipped["image_without_usable_sentence"] += 1
                continue
            self.image_ids.append(image_id)
            self.image_sentences.append(sids)
            self.num_regions.append(min(n, self.max_regions))
        not_retrieved = sum(1 for i in self.store.image_ids if i not in by_image)
        if not_retrieved:
            self.skipped["image_not_retrieved"] += not_retrieved

    def __len__(self) -> int:
        return len(self.image_ids)

    def summary(self) -> dict[str, Any]:
        return {"images": len(self.image_ids), "sentences": len(self.sent_tokens), "negatives": self.negatives,
                "negative_pool": len(self.pool),
                "k": self.k, "max_k": self.max_k, "skipped": dict(sorted(self.skipped.items())),
                "regions": str(self.layout.regions.root), "retrieval": str(self.layout.retrieval.root),
                "phrases": str(self.layout.phrases.root)}

    def regions(self, i: int) -> ImageRegions:
        return self.store[self.image_ids[i]]

    def tag_tokens(self, tags: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[CLS] tag pieces [SEP] and each piece's region index (-1 for [CLS]/[SEP]), truncated."""
        new = sorted({t for t in tags if t not in self._tag_cache})
        if new:
            for tag, toks in zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"]):
                self._tag_cache[tag] = list(toks)
        ids, owner = [self.cls_id], [-1]
        for r, tag in enumerate(tags):
            pieces = self._tag_cache[tag]
            room = self.max_text_len - 1 - len(ids)
            if room <= 0:
                break
            ids += pieces[:room]
            owner += [r] * len(pieces[:room])
        ids.append(self.sep_id)
        owner.append(-1)
        return np.array(ids, dtype=np.int64), np.array(owner, dtype=np.int64)

    def match(self, image_id: str, sid: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(region_phrase [n], region_sim [n]) of a pair (every usable pair has a match row)."""
        rp, rs = self.matches[(image_id, sid)]
        phrase = np.full(n, -1, dtype=np.int64)
        sim = np.zeros(n, dtype=np.float32)
        m = min(n, len(rp), len(rs))
        phrase[:m], sim[:m] = rp[:m], rs[:m]
        return phrase, sim


# ----------------------------------------------------------------------------------------------
# dataset


class PretrainDataset(Dataset):
    """One item per usable image: its regions, tags and ONE of its top-K sentences drawn at random.

    The draw uses Python's ``random``, which the trainer re-seeds per batch (exact resume). Items are
    numpy arrays; ``PretrainCollator`` pads and masks them.
    """

    def __init__(self, corpus: PretrainCorpus) -> None:
        if len(corpus) == 0:
            raise ValueError(f"no usable image in the corpus (skipped: {dict(corpus.skipped)})")
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.corpus
        image_id = c.image_ids[i]
        reg = c.regions(i)
        n = c.num_regions[i]
        sids = c.image_sentences[i]
        sid = sids[random.randrange(len(sids))]
        tag_ids, tag_region = c.tag_tokens(reg.tags[:n])
        region_phrase, region_sim = c.match(image_id, sid, n)
        own = np.full(c.max_k, -1, dtype=np.int64)
        own[:len(sids)] = c.pool_positions(sids)
        return {
            "index": i, "sentence_id": sid, "own_pool": own,
            "features": reg.features[:n],  # float16 as stored; the collator converts the padded batch once
            "positions": reg.position_features()[:n],
            "class_ids": np.asarray(reg.class_ids[:n], dtype=np.int64),
            "class_probs": None if reg.class_probs is None else reg.class_probs[:n],
            "tag_ids": tag_ids, "tag_region": tag_region,
            "text_ids": c.sent_tokens[sid], "token_phrase": c.token_phrase.get(sid, np.full(len(c.sent_tokens[sid]), -1)),
            "region_phrase": region_phrase, "region_sim": region_sim,
        }


# ----------------------------------------------------------------------------------------------
# batch


@dataclass
class PretrainBatch:
    """A padded, masked pre-training batch. B = batch, R = regions, Lt = tag sequence, L = sentence,
    Ls = I-S sentence (positive or negative), D = feature dim, C = region classes, P = p-MRTC pieces.

    Shared region inputs:
      region_features  [B, R, D] float  ORIGINAL features (MRFR target, I-S input)
      region_positions [B, R, 5] float; region_mask [B, R] bool; region_class_ids [B, R] long (-1 none)
      region_class_probs [B, R, C] float or None
    R-T ([tags ; regions]):
      rt_input_ids, rt_attention_mask, rt_mlm_labels [B, Lt]; rt_box_positions [B, Lt, 5] (each tag
      piece's region box), rt_box_mask [B, Lt]; rt_region_features [B, R, D] (masked), rt_region_masked [B, R]
    R-N ([t^r ; regions], one modality masked per sample):
      text_input_ids [B, L] unmasked t^r; text_attention_mask [B, L]; rn_input_ids, rn_mlm_labels [B, L];
      rn_region_features [B, R, D]; rn_region_masked [B, R]; rn_pmrtc_targets [B, R, P]
    I-S ([t^r or a random sentence ; regions]):
      is_input_ids, is_attention_mask, is_mlm_labels [B, Ls] (MLM on positives only); itm_labels [B] float
    Bookkeeping: image_index [B], sentence_ids [B], negative_ids [B] (-1 for positives) long.
    """

    region_features: torch.Tensor
    region_positions: torch.Tensor
    region_mask: torch.Tensor
    region_class_ids: torch.Tensor
    region_class_probs: torch.Tensor | None
    rt_input_ids: torch.Tensor
    rt_attention_mask: torch.Tensor
    rt_mlm_labels: torch.Tensor
    rt_box_positions: torch.Tensor
    rt_box_mask: torch.Tensor
    rt_region_features: torch.Tensor
    rt_region_masked: torch.Tensor
    text_input_ids: torch.Tensor
    text_attention_mask: torch.Tensor
    rn_input_ids: torch.Tensor
    rn_mlm_labels: torch.Tensor
    rn_region_features: torch.Tensor
    rn_region_masked: torch.Tensor
    rn_pmrtc_targets: torch.Tensor
    is_input_ids: torch.Tensor
    is_attention_mask: torch.Tensor
    is_mlm_labels: torch.Tensor
    itm_labels: torch.Tensor
    image_index: torch.Tensor
    sentence_ids: torch.Tensor
    negative_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_index.shape[0])


def _pad(arrays: Sequence[np.ndarray], value: float, dtype: torch.dtype) -> torch.Tensor:
    """Stack variable-length arrays [n_i, ...] into [B, max n, ...] filled with ``value``.

    Built in numpy in the items' own dtype (float16 features stay half-size) and converted once.
    """
    longest = max(len(a) for a in arrays)
    shape = (len(arrays), longest, *arrays[0].shape[1:])
    out = np.zeros(shape, dtype=arrays[0].dtype) if value == 0 else np.full(shape, value, dtype=arrays[0].dtype)
    for b, a in enumerate(arrays):
        out[b, :len(a)] = a
    return torch.from_numpy(out).to(dtype)


class PretrainCollator:
    """Pads items into a :class:`PretrainBatch` and applies all masking rules (METHOD §5).

    Randomness: one ``torch.Generator`` per batch seeded from the global torch RNG (re-seeded per
    batch by the trainer). ``neg_fraction``: share of I-S pairs given a random negative sentence
    (0.5 for μ-VLA; 0 for round robin, whose text batches use every sentence for MLM).
    """

    def __init__(self, corpus: PretrainCorpus, mask_prob: float = 0.15, neg_fraction: float = 0.5) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.corpus = corpus
        self.mask_prob = mask_prob
        self.neg_fraction = neg_fraction

    def __call__(self, items: list[dict[str, Any]]) -> PretrainBatch:
        c = self.corpus
        B = len(items)
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        tok = dict(mask_token_id=c.mask_id, vocab_size=c.vocab_size, special_ids=c.special_ids, generator=g,
                   prob=self.mask_prob)

        feats = _pad([it["features"] for it in items], 0.0, torch.float32)
        positions = _pad([it["positions"] for it in items], 0.0, torch.float32)
        region_mask = _pad([np.ones(len(it["features"]), dtype=bool) for it in items], False, torch.bool)
        class_ids = _pad([it["class_ids"] for it in items], -1, torch.long)
        class_probs = None
        if all(it["class_probs"] is not None for it in items):
            class_probs = _pad([it["class_probs"] for it in items], 0.0, torch.float32)

        # R-T: tags (each piece carries its region's box) + regions
        tag_ids = _pad([it["tag_ids"] for it in items], c.pad_id, torch.long)
        tag_mask = _pad([np.ones(len(it["tag_ids"]), dtype=bool) for it in items], False, torch.bool)
        tag_region = _pad([it["tag_region"] for it in items], -1, torch.long)
        box_mask = tag_region >= 0
        box_pos = positions.gather(1, tag_region.clamp(min=0)[..., None].expand(-1, -1, 5)) * box_mask[..., None]
        rt = mask_rt(tag_ids, tag_mask, feats, region_mask, ensure_one=False, **tok)

        # R-N: phrase tokens or matched regions, one modality per sample
        text_ids = _pad([it["text_ids"] for it in items], c.pad_id, torch.long)
        text_mask = _pad([np.ones(len(it["text_ids"]), dtype=bool) for it in items], False, torch.bool)
        token_phrase = _pad([it["token_phrase"] for it in items], -1, torch.long)
        region_phrase = _pad([it["region_phrase"] for it in items], -1, torch.long)
        region_sim = _pad([it["region_sim"] for it in items], 0.0, torch.float32)
        rn = mask_rn(text_ids, token_phrase >= 0, feats, region_sim, region_phrase >= 0, **tok)
        targets = phrase_targets(text_ids, token_phrase, region_phrase, PMRTC_MAX_PIECES)

        # I-S: half the pairs get a random sentence of the negative pool that is none of the image's top-K
        is_negative = torch.zeros(B, dtype=torch.bool)
        neg_ids = torch.full((B,), -1, dtype=torch.long)
        if self.neg_fraction > 0:
            own = torch.from_numpy(np.stack([it["own_pool"] for it in items]))
            is_negative, neg_pool = sample_itm_negatives(B, len(c.pool), g, exclude=own,
                                                         neg_fraction=self.neg_fraction)
            neg_ids = torch.where(is_negative, torch.from_numpy(c.pool)[neg_pool.clamp(min=0)], neg_ids)
        is_seqs = [c.negative_tokens[int(neg_ids[b])] if is_negative[b] else items[b]["text_ids"] for b in range(B)]
        is_ids = _pad(is_seqs, c.pad_id, torch.long)
        is_mask = _pad([np.ones(len(s), dtype=bool) for s in is_seqs], False, torch.bool)
        # Corrupt negatives too but keep MLM labels on positives only (METHOD §5): with masking on
        # positives alone, "[MASK] present" would reveal the ITM label and the head would learn that.
        is_input, is_labels = mask_is(is_ids, is_mask, torch.ones(B, dtype=torch.bool), **tok)
        is_labels = is_labels.masked_fill(is_negative[:, None], -100)

        return PretrainBatch(
            region_features=feats, region_positions=positions, region_mask=region_mask,
            region_class_ids=class_ids, region_class_probs=class_probs,
            rt_input_ids=rt.input_ids, rt_attention_mask=tag_mask, rt_mlm_labels=rt.mlm_labels,
            rt_box_positions=box_pos, rt_box_mask=box_mask, rt_region_features=rt.region_features,
            rt_region_masked=rt.region_masked,
            text_input_ids=text_ids, text_attention_mask=text_mask, rn_input_ids=rn.input_ids,
            rn_mlm_labels=rn.mlm_labels, rn_region_features=rn.region_features, rn_region_masked=rn.region_masked,
            rn_pmrtc_targets=targets,
            is_input_ids=is_input, is_attention_mask=is_mask, is_mlm_labels=is_labels,
            itm_labels=(~is_negative).float(),
            image_index=torch.tensor([it["index"] for it in items], dtype=torch.long),
            sentence_ids=torch.tensor([it["sentence_id"] for it in items], dtype=torch.long),
            negative_ids=neg_ids,
        )
