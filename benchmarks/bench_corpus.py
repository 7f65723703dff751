"""Corpus-builder benchmark: per-stage throughput, peak memory, and retrieval quality on real data.

    python benchmarks/bench_corpus.py [--data ../shared/data] [--out runs/bench_corpus]

Throughput: regions (images/s, detector and coco-instances backends), sentence encoding
(sentences/s), retrieval (queries/s), phrases (images/s). Peak memory is the process's resident
peak (ru_maxrss) after each stage, so it only grows.

Quality (needs ../shared/data): the 400 ground-truth captions of the 80 coco-mini images are mixed
into the 24,219-caption COCO val2017 pool; each image's tags query the whole pool and we report
recall@1/5/10 of retrieving one of the image's OWN captions, for both query modes and for oracle
(coco-instances) and detector tags. Stages are resumable, so a rerun reuses finished outputs; pass
--fresh to measure from scratch.
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

from muvla.phrases.stage import PhrasesConfig, run_phrases  # noqa: E402
from muvla.regions.stage import RegionsConfig, run_regions  # noqa: E402
from muvla.retrieval.stage import RetrievalConfig, run_retrieval  # noqa: E402
from muvla.text.stage import TextConfig, run_text  # noqa: E402

QUERY_MODES = ("official", "counted")
KS = (1, 5, 10)


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
        "detector": RegionsConfig(out=args.out / "regions_detector", backend="detector", images=images),
    }
    for name, cfg in backends.items():
        fresh = not (Path(cfg.out) / "index.parquet").exists()
        _, seconds = timed(f"regions ({name})", run_regions, cfg)
        if fresh:
            figures[f"regions_{name}_images_per_s"] = n_images / seconds

    print("== text (pool + the coco-mini ground-truth captions)")
    text_cfg = TextConfig(out=args.out / "text", corpus=[pool, captions])
    timed("text", run_text, text_cfg)
    own = own_caption_ids(args.out / "text", captions)
    n_sent = pq.read_metadata(args.out / "text" / "sentences.parquet").num_rows
    print(f"  {n_sent} sentences; {sum(len(v) for v in own.values())} own captions of {len(own)} images")

    print("== retrieval")
    results: dict[tuple[str, str], dict[str, float]] = {}
    shared_embeddings: Path | None = None
    for backend in backends:
        for mode in QUERY_MODES:
            out = args.out / f"retrieval_{backend}_{mode}"
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
    phrases_out = args.out / "phrases_oracle_counted"
    fresh = not (phrases_out / "matches.parquet").exists()
    _, seconds = timed("phrases", run_phrases, PhrasesConfig(out=phrases_out,
                                                            retrieval=args.out / "retrieval_oracle_counted"))
    if fresh:
        figures["phrases_images_per_s"] = n_images / seconds

    print("\n## Throughput (this machine)")
    for key, value in figures.items():
        print(f"- {key}: {value:.2f}")
    print(f"- peak RSS: {peak_rss_mb():.0f} MB")
    print(f"\n## Own-caption retrieval: {len(own)} coco-mini images, {n_sent} sentences in the pool")
    print("| tags | query mode | R@1 | R@5 | R@10 | corpus fraction ever retrieved |")
    print("|---|---|---|---|---|---|")
    for (backend, mode), r in results.items():
        print(f"| {backend} | {mode} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | "
              f"{r['retrieved_fraction']:.4f} |")


if __name__ == "__main__":
    main()
