"""Corpus-builder benchmark: per-stage throughput, peak memory, and retrieval quality on real data.

    python benchmarks/bench_corpus.py [--data ../shared/data] [--out runs/bench_corpus]
        [--flickr-regions DIR] [--coco-detector-regions DIR] [--quality-only]

Throughput: regions (images/s, proposals and coco-instances backends), sentence encoding
(sentences/s), retrieval (queries/s), phrases (images/s). Peak memory is the process's resident
peak (ru_maxrss) after each stage, so it only grows.

Quality (needs ../shared/data): own-caption recall@1/5/10 of every ranking (query mode x hubness
correction) with 95% bootstrap intervals, and the paired-bootstrap difference to the reference
recipe (official, no correction), on development sets whose own captions hide in the 24,219-caption
COCO val2017 pool:
(a) the 80 coco-mini images with oracle tags (coco-instances) and with the proposals backend's tags;
(b) the caption simulation: ~4,700 pool images, tags from four of their captions, the fifth to find,
    split in a selection half and a confirmation half (choose on one, report the other);
(c) flickr8k-750 (and coco-mini) with a real detector's tags, when ``--flickr-regions`` /
    ``--coco-detector-regions`` name region stores.
Stages are resumable, so a rerun reuses finished outputs; pass --fresh to measure from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from muvla import encoders  # noqa: E402
from muvla.phrases.stage import PhrasesConfig, run_phrases  # noqa: E402
from muvla.regions.stage import RegionsConfig, run_regions  # noqa: E402
from muvla.retrieval.devsets import DevSet, caption_simulation_devset, hidden_caption_devset  # noqa: E402
from muvla.retrieval.evaluation import KS, Interval, bootstrap_recall, own_caption_hits, paired_difference  # noqa: E402
from muvla.retrieval.rerank import RankingConfig, read_tagged_images  # noqa: E402
from muvla.retrieval.stage import RetrievalConfig, run_retrieval  # noqa: E402
from muvla.text.stage import TextConfig, run_text  # noqa: E402

QUERY_MODES = ("official", "counted")
# Every ranking measured on the development sets; the first is the reference recipe.
RANKINGS = {f"{mode}{'+csls' if hub == 'csls' else ''}": RankingConfig(query_mode=mode, hubness=hub)
            for hub in ("none", "csls") for mode in ("official", "counted", "salient")}
REFERENCE = "official"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(label: str, fn, *args) -> tuple[dict, float]:
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    print(f"  {label}: {seconds:.1f}s, peak RSS so far {peak_rss_mb():.0f} MB", flush=True)
    return result, seconds


def own_caption_ids(text_dir: Path, captions_json: Path) -> dict[str, set[int]]:
    """image stem -> sentence ids of its ground-truth captions in the sentence store."""
    sentences = pq.read_table(text_dir / "sentences.parquet", columns=["sentence_id", "text"]).to_pydict()
    by_text = {" ".join(t.split()).lower(): sid for sid, t in zip(sentences["sentence_id"], sentences["text"])}
    data = json.loads(captions_json.read_text(encoding="utf-8"))
    stem = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
    own: dict[str, set[int]] = {}
    missing = 0
    for ann in data["annotations"]:
        sid = by_text.get(" ".join(ann["caption"].split()).lower())
        if sid is None:
            missing += 1
            continue
        own.setdefault(stem[ann["image_id"]], set()).add(int(sid))
    if missing:
        print(f"  note: {missing} ground-truth captions not found verbatim in the sentence store")
    return own


def recall_at_k(topk_path: Path, own: dict[str, set[int]]) -> dict[str, float]:
    topk = pq.read_table(topk_path).to_pydict()
    ranked: dict[str, list[int]] = {}
    for image_id, _rank, sid in sorted(zip(topk["image_id"], topk["rank"], topk["sentence_id"])):
        ranked.setdefault(image_id, []).append(int(sid))
    out = {}
    for k in KS:
        hits = [bool(set(ranked.get(image, [])[:k]) & ids) for image, ids in own.items()]
        out[f"R@{k}"] = float(np.mean(hits)) if hits else float("nan")
    return out


class CachedEncoder:
    """Sentence-BERT embeddings by text, encoded once and kept in ``folder`` (sentences.json + .npy) across runs."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.texts_path, self.array_path = folder / "sentences.json", folder / "sentences.npy"
        texts = json.loads(self.texts_path.read_text(encoding="utf-8")) if self.texts_path.exists() else []
        self.array = np.load(self.array_path) if texts else np.zeros((0, 0), np.float32)
        self.row = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts: list[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self.row))
        if new:
            fresh = encoders.encode(new, batch_size=128)
            first = len(self.row)
            self.array = fresh if first == 0 else np.concatenate([self.array, fresh])
            self.row.update((t, first + i) for i, t in enumerate(new))
            np.save(self.array_path, self.array)
            self.texts_path.write_text(json.dumps(list(self.row)), encoding="utf-8")
        return self.array[[self.row[t] for t in texts]]


def _cell(interval: Interval, j: int, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(interval.mean[j])} [{f.format(interval.low[j])}, {f.format(interval.high[j])}]"


def report_devset(devset: DevSet, encode: CachedEncoder) -> None:
    """One table: every ranking's recall@k with its 95% interval and its paired difference to the reference."""
    embeddings = encode(devset.sentences)
    n_relevant = sum(len(r) for r in devset.relevant)
    print(f"\n### {devset.name}: {len(devset.images)} images, {n_relevant} own captions hidden among "
          f"{len(devset.sentences)} sentences")
    print("| ranking | " + " | ".join(f"R@{k}" for k in KS) + " | " +
          " | ".join(f"R@{k} - {REFERENCE}" for k in KS) + " |")
    print("|---" * (1 + 2 * len(KS)) + "|")
    reference = None
    for label, cfg in RANKINGS.items():
        hits = own_caption_hits(devset, embeddings, cfg, encode)
        reference = hits if reference is None else reference
        recall = bootstrap_recall(hits)
        diff = paired_difference(hits, reference)
        print(f"| {label} | " + " | ".join(_cell(recall, j) for j in range(len(KS))) + " | " +
              " | ".join(_cell(diff, j, signed=True) if label != REFERENCE else "-" for j in range(len(KS))) +
              " |", flush=True)


def development_sets(data: Path, regions: dict[str, Path], flickr_regions: Path | None) -> list[DevSet]:
    """(a) coco-mini per tag source, (b) the caption simulation's two halves, (c) flickr8k-750 if given."""
    coco = data / "coco-mini"
    pool = data / "text" / "coco_val2017_captions_pool.json"
    sets = [hidden_caption_devset(f"coco-mini, {name} tags", read_tagged_images(path),
                                  coco / "captions_train2017.json", pool) for name, path in regions.items()]
    select, confirm = caption_simulation_devset(pool, seed=0).split(0.5, seed=1)
    sets += [select, confirm]
    if flickr_regions is not None:
        flickr = data / "flickr8k-750" / "captions.json"
        sets.append(hidden_caption_devset(f"flickr8k-750, tags of {flickr_regions.name}",
                                          read_tagged_images(flickr_regions), flickr, pool))
    return sets


def throughput_only(out: Path) -> None:
    """Without shared data: detector throughput on the embedded sample images."""
    from muvla.demo import write_sample_images

    images = out / "sample_images"
    write_sample_images(images)
    n = len(list(images.glob("*.png")))
    _, seconds = timed("regions (detector)", run_regions, RegionsConfig(out=out / "regions", images=images))
    print(f"regions detector: {n / seconds:.2f} images/s on {n} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_corpus")
    parser.add_argument("--fresh", action="store_true", help="delete earlier outputs first")
    parser.add_argument("--flickr-regions", type=Path, default=None,
                        help="region store of flickr8k-750 (a real detector's tags) for dev set (c)")
    parser.add_argument("--coco-detector-regions", type=Path, default=None,
                        help="region store of coco-mini from a real detector, added to dev set (a)")
    parser.add_argument("--embedding-cache", type=Path, default=None,
                        help="folder keeping dev-set sentence embeddings between runs (default: OUT/devset_embeddings)")
    parser.add_argument("--quality-only", action="store_true",
                        help="only the oracle regions and the development sets (no throughput stages)")
    args = parser.parse_args()
    os.environ.setdefault("MUVLA_NO_PROGRESS", "1")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads: {__import__('torch').get_num_threads()}, out: {args.out}")

    coco = args.data / "coco-mini"
    if not coco.exists():
        print(f"{args.data} not found: measuring throughput on the sample images only")
        throughput_only(args.out)
        return

    images = coco / "images"
    n_images = len(list(images.glob("*.jpg")))
    captions = coco / "captions_train2017.json"
    pool = args.data / "text" / "coco_val2017_captions_pool.json"
    figures: dict[str, float] = {}

    print("== regions")
    backends = {
        "oracle": RegionsConfig(out=args.out / "regions_oracle", backend="coco-instances", images=images,
                                coco_instances=coco / "instances_train2017.json"),
        "proposals": RegionsConfig(out=args.out / "regions_proposals", backend="proposals", images=images),
    }
    if args.quality_only:
        del backends["proposals"]
    for name, cfg in backends.items():
        fresh = not (Path(cfg.out) / "index.parquet").exists()
        _, seconds = timed(f"regions ({name})", run_regions, cfg)
        if fresh:
            figures[f"regions_{name}_images_per_s"] = n_images / seconds

    if not args.quality_only:
        stage_throughput(args.out, backends, captions, pool, n_images, figures)

    print("\n## Own-caption retrieval on the development sets (95% bootstrap intervals over images)")
    tag_sources = {name: Path(cfg.out) for name, cfg in backends.items()}
    if args.coco_detector_regions is not None:
        tag_sources[args.coco_detector_regions.name] = args.coco_detector_regions
    encode = CachedEncoder(args.embedding_cache or args.out / "devset_embeddings")
    for devset in development_sets(args.data, tag_sources, args.flickr_regions):
        report_devset(devset, encode)
    if args.flickr_regions is None:
        print("\n(c) flickr8k-750 skipped: pass --flickr-regions with a detector's region store of its images")


def stage_throughput(out_root: Path, backends: dict[str, RegionsConfig], captions: Path, pool: Path,
                     n_images: int, figures: dict[str, float]) -> None:
    """Text, retrieval (both query modes, stage path) and phrases stages: speed, memory, stage recall."""
    print("== text (pool + the coco-mini ground-truth captions)")
    text_cfg = TextConfig(out=out_root / "text", corpus=[pool, captions])
    timed("text", run_text, text_cfg)
    own = own_caption_ids(out_root / "text", captions)
    n_sent = pq.read_metadata(out_root / "text" / "sentences.parquet").num_rows
    print(f"  {n_sent} sentences; {sum(len(v) for v in own.values())} own captions of {len(own)} images")

    print("== retrieval")
    results: dict[tuple[str, str], dict[str, float]] = {}
    shared_embeddings: Path | None = None
    for backend in backends:
        for mode in QUERY_MODES:
            out = out_root / f"retrieval_{backend}_{mode}"
            out.mkdir(parents=True, exist_ok=True)
            if shared_embeddings is not None and not (out / "embeddings").exists():
                (out / "embeddings").symlink_to(shared_embeddings.resolve(), target_is_directory=True)
            cfg = RetrievalConfig(out=out, regions=backends[backend].out, text=text_cfg.out, k=max(KS),
                                  query_mode=mode)
            summary, _ = timed(f"retrieval ({backend}, {mode})", run_retrieval, cfg)
            if shared_embeddings is None:
                shared_embeddings = out / "embeddings"
                if summary.get("encode_sentences_per_s"):
                    figures["encode_sentences_per_s"] = summary["encode_sentences_per_s"]
            if summary.get("queries_per_s"):
                figures[f"queries_per_s_{backend}_{mode}"] = summary["queries_per_s"]
            results[(backend, mode)] = recall_at_k(out / "topk.parquet", own)
            results[(backend, mode)]["retrieved_fraction"] = summary["hubness"]["fraction_of_corpus_retrieved"]

    print("== phrases (oracle tags, counted queries)")
    phrases_out = out_root / "phrases_oracle_counted"
    fresh = not (phrases_out / "matches.parquet").exists()
    _, seconds = timed("phrases", run_phrases, PhrasesConfig(out=phrases_out,
                                                            retrieval=out_root / "retrieval_oracle_counted"))
    if fresh:
        figures["phrases_images_per_s"] = n_images / seconds

    print("\n## Throughput (this machine)")
    for key, value in figures.items():
        print(f"- {key}: {value:.2f}")
    print(f"- peak RSS: {peak_rss_mb():.0f} MB")
    print(f"\n## Retrieval stage end to end: {len(own)} coco-mini images, {n_sent} sentences in the pool")
    print("| tags | query mode | R@1 | R@5 | R@10 | corpus fraction ever retrieved |")
    print("|---|---|---|---|---|---|")
    for (backend, mode), r in results.items():
        print(f"| {backend} | {mode} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | "
              f"{r['retrieved_fraction']:.4f} |")


if __name__ == "__main__":
    main()
