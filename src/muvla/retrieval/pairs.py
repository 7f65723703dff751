"""Pairings other than retrieval, for the paper's baselines (METHOD §7).

Each writes a folder in the retrieval stage's format (``topk.parquet``: image_id, rank, sentence_id,
score), so the phrases stage and the pre-training code need no special case for a baseline:

- ``random``: every image gets K random sentences (the *joint unaligned* baseline);
- ``aligned``: every image gets its own ground-truth captions (the supervised upper bound);
- ``aligned_ratio``: a fraction ``p`` of the images get their captions, the rest random sentences
  (the alignment-ratio analysis).

Ground-truth captions come from a COCO captions JSON and must be in the sentence store (build it with
``muvla text --corpus captions.json ...``); they are found by their normalised text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muvla.corpus.captions import CaptionsFileError, caption_key, read_captions_file
from muvla.corpus.layout import RegionsOutput, RetrievalOutput, TextOutput, TopK
from muvla.corpus.provenance import OutputPolicy, Step, StepResult, digest_file, run_step
from muvla.retrieval.stage import DEFAULT_K
from muvla.utils.config import ConfigError, check_choices, output_settings, setting

PAIRING_MODES = ("random", "aligned", "aligned_ratio")


@dataclass
class PairsConfig(OutputPolicy):
    """``muvla pairs``: a baseline pairing written in the retrieval stage's format."""

    out: Path = setting(help="output folder (topk.parquet in the retrieval format)")
    regions: Path = setting(help="regions stage output folder")
    text: Path = setting(help="text stage output folder; must contain the captions for aligned modes")
    mode: str = setting("random", choices=PAIRING_MODES,
                        help="random: K random sentences per image (joint unaligned); aligned: the image's own "
                             "captions; aligned_ratio: a fraction p of the images get their captions")
    captions: Path | None = setting(None, help="COCO captions JSON of the images (aligned, aligned_ratio)")
    p: float = setting(1.0, help="aligned_ratio: fraction of images paired with their own captions")
    k: int = setting(DEFAULT_K, help="sentences per image")
    seed: int = setting(0, help="seed of the random pairings")

    def validate(self) -> None:
        check_choices(self, "pairs")
        if self.mode != "random" and self.captions is None:
            raise ConfigError(f"pairs: mode {self.mode!r} needs --captions (a COCO captions JSON)")
        if self.captions is not None and not Path(self.captions).is_file():
            raise ConfigError(f"pairs: captions file {self.captions} not found")
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"pairs: p must be in [0, 1], got {self.p}")
        if self.k < 1:
            raise ConfigError(f"pairs: k must be >= 1, got {self.k}")


def caption_sentence_ids(captions_json: Path, text: TextOutput) -> dict[str, list[int]]:
    """image id (file stem, as in the region store) -> sentence ids of its captions, matched by
    ``caption_key`` (spacing and case do not matter)."""
    try:
        captions = read_captions_file(captions_json)
    except CaptionsFileError as err:
        raise ConfigError(f"pairs: {err}") from err
    n = text.count()
    by_text = {caption_key(t): sid for sid, t in text.texts(range(n)).items()}
    out: dict[str, list[int]] = {}
    for caption in captions.captions():
        if caption.image_id is None or caption.text is None:
            continue
        sid = by_text.get(caption_key(caption.text))
        image = captions.stem_of(caption.image_id)
        if sid is not None and sid not in out.setdefault(image, []):
            out[image].append(sid)
    return out


def run_pairs(cfg: PairsConfig) -> dict:
    cfg.validate()
    regions, text, output = RegionsOutput(Path(cfg.regions)), TextOutput(Path(cfg.text)), RetrievalOutput(Path(cfg.out))
    inputs = {"regions": regions.digest(), "text": text.digest()}
    if cfg.captions is not None:
        inputs["captions"] = digest_file(Path(cfg.captions))
    step = Step("pairs", output.root, output_settings(cfg, exclude=("regions", "text", "captions")), inputs,
                output.outputs(), cfg, sources={"regions": regions.root, "text": text.root, "captions": cfg.captions})
    return run_step(step, lambda _start: StepResult(_pair(cfg, regions, text, output)), overwrite=cfg.overwrite)


def _pair(cfg: PairsConfig, regions: RegionsOutput, text: TextOutput, output: RetrievalOutput) -> dict:
    image_ids, _ = regions.image_tags()
    n_sentences = text.count()
    if n_sentences == 0:
        raise ConfigError(f"pairs: {text.root} holds no sentences")
    own = caption_sentence_ids(cfg.captions, text) if cfg.captions is not None else {}
    rng = np.random.default_rng(cfg.seed)
    aligned_images = set()
    if cfg.mode == "aligned":
        aligned_images = set(image_ids)
    elif cfg.mode == "aligned_ratio":
        n_aligned = int(round(cfg.p * len(image_ids)))
        aligned_images = {image_ids[i] for i in rng.permutation(len(image_ids))[:n_aligned]}

    rows_image, rows_rank, rows_sid = [], [], []
    no_caption: list[str] = []
    for image in image_ids:
        if image in aligned_images:
            chosen = own.get(image, [])[: cfg.k]
            if not chosen:
                no_caption.append(image)
                continue
        else:
            chosen = rng.choice(n_sentences, size=min(cfg.k, n_sentences), replace=False).tolist()
        for rank, sid in enumerate(chosen):
            rows_image.append(image)
            rows_rank.append(rank)
            rows_sid.append(int(sid))
    output.write_topk(TopK(rows_image, np.asarray(rows_rank, np.int32), np.asarray(rows_sid, np.int64),
                           np.full(len(rows_sid), np.nan, np.float32)))
    return {"mode": cfg.mode, "p": cfg.p, "k": cfg.k, "images": len(image_ids),
            "aligned_images": len(aligned_images) - len(no_caption),
            "images_without_caption_skipped": len(no_caption), "examples": no_caption[:20],
            "pairs": len(rows_image)}


def describe(summary: dict) -> list[str]:
    """The few lines ``muvla pairs`` prints at the end (details in summary.json)."""
    lines = [f"pairs [{summary['mode']}]: {summary['pairs']} pairs for {summary['images']} images"]
    if summary.get("images_without_caption_skipped"):
        lines.append(f"  {summary['images_without_caption_skipped']} image(s) had no caption in the text store "
                     "and were skipped")
    return lines
