"""Detector benchmark: tag and box quality against the COCO labels, own-caption retrieval, speed, memory.

    python benchmarks/bench_detectors.py [--data ../shared/data] [--out runs/bench_detectors]
        [--backends proposals centernet coco-instances] [--hf-model FOLDER_OR_NAME [--hf-vocabulary FILE]]
        [--datasets coco-mini flickr8k-750] [--threads 1] [--fresh]

Per backend and image set, the regions stage runs in a child process (so peak memory and time are
that backend's own): images/s (wall), CPU seconds per image, peak RSS. A region store already in
the output folder (an earlier run, or one linked there) is reused and gets no speed figure.

Quality on coco-mini (80 images, 739 ground-truth boxes): tag precision/recall = the image's set
of detected class words vs its labelled COCO classes (both as caption words); box precision/recall
at IoU 0.5 (same class, greedy by score). Thresholds apply to region scores; region 0 (the whole
image) is not an object and is left out.

Retrieval: each image's own captions are hidden in the 24,219-caption COCO val2017 pool (coco-mini:
400 captions; flickr8k-750: 3,750); recall@1/5/10 that the image's tag query retrieves one of its
own captions, both query modes, with 95% bootstrap intervals over images (2,000 resamples). The
sweep over the query-side tag threshold (`min_tag_score` of the retrieval stage) reuses the retrieval
stage's sentence embeddings and exact inner-product search, so its figures equal the stage's; one
setting per backend is also run through the real retrieval stage as a check.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from muvla import encoders  # noqa: E402
from muvla.corpus.region_store import RegionStore  # noqa: E402
from muvla.regions.proposals import box_iou  # noqa: E402
from muvla.regions.tags import caption_word  # noqa: E402
from muvla.retrieval.queries import QUERY_MODES, make_query  # noqa: E402
from muvla.retrieval.stage import RetrievalConfig, run_retrieval  # noqa: E402
from muvla.text.stage import TextConfig, run_text  # noqa: E402

KS = (1, 5, 10)
THRESHOLDS = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
BOOTSTRAP = 2000


# ---------------------------------------------------------------------------------------- regions

def _regions_child(cfg_kwargs: dict, threads: int, queue: mp.Queue) -> None:
    import torch

    from muvla.regions.stage import RegionsConfig, run_regions

    torch.set_num_threads(threads)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    summary = run_regions(RegionsConfig(**cfg_kwargs))
    queue.put({"summary": summary, "wall_s": time.perf_counter() - start_wall,
               "cpu_s": time.process_time() - start_cpu,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})


def run_regions_measured(cfg_kwargs: dict, threads: int) -> dict:
    """Run the regions stage in a fresh process; its time and peak memory are the backend's own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_regions_child, args=(cfg_kwargs, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def backend_settings(name: str, data: Path, dataset: str, out: Path, args: argparse.Namespace) -> dict | None:
    images = data / dataset / "images"
    base = {"out": out, "images": images, "progress": False, "num_threads": args.threads}
    if name == "coco-instances":
        if dataset != "coco-mini":
            return None
        return {**base, "backend": "coco-instances", "coco_instances": data / dataset / "instances_train2017.json"}
    if name == "transformers":
        if args.hf_model is None:
            return None
        extra = {"vocabulary": args.hf_vocabulary} if args.hf_vocabulary else {}
        return {**base, "backend": "transformers", "detector_model": args.hf_model, **extra}
    return {**base, "backend": name}


# ---------------------------------------------------------------------------------------- quality

def coco_labels(instances: Path) -> tuple[dict[str, list[tuple[np.ndarray, str]]], list[str]]:
    """image stem -> [(box x1y1x2y2, caption word of the class)] (crowd boxes left out)."""
    data = json.loads(instances.read_text(encoding="utf-8"))
    cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    stem = {int(im["id"]): Path(im["file_name"]).stem for im in data["images"]}
    out: dict[str, list[tuple[np.ndarray, str]]] = {s: [] for s in stem.values()}
    for ann in data["annotations"]:
        if ann.get("iscrowd"):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        out[stem[int(ann["image_id"])]].append((np.array([x, y, x + w, y + h]), caption_word(cats[int(ann["category_id"])])))
    return out, [caption_word(c) for c in cats.values()]


def object_regions(image) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Regions 1.. (region 0 is the whole image): boxes, scores, tags as caption words."""
    return (np.asarray(image.boxes[1:], np.float64), np.asarray(image.scores[1:], np.float64),
            [caption_word(t) for t in image.tags[1:]])


def detection_quality(store: RegionStore, labels: dict, threshold: float) -> dict[str, float]:
    tag_tp = tag_pred = tag_true = 0
    box_tp = box_pred = box_true = 0
    agnostic_hit = 0
    for image in store:
        gt = labels.get(str(image.image_id), [])
        boxes, scores, tags = object_regions(image)
        keep = np.flatnonzero(scores >= threshold)
        pred_tags = {tags[i] for i in keep}
        true_tags = {t for _, t in gt}
        tag_tp += len(pred_tags & true_tags)
        tag_pred += len(pred_tags)
        tag_true += len(true_tags)
        box_pred += len(keep)
        box_true += len(gt)
        if not gt or not len(keep):
            continue
        gt_boxes = np.stack([b for b, _ in gt])
        iou = box_iou(boxes[keep], gt_boxes)
        agnostic_hit += int((iou.max(axis=0) >= 0.5).sum())
        used = np.zeros(len(gt), dtype=bool)
        for row in np.argsort(-scores[keep], kind="stable"):
            cand = [j for j in range(len(gt)) if not used[j] and gt[j][1] == tags[keep[row]] and iou[row, j] >= 0.5]
            if cand:
                best = max(cand, key=lambda j: iou[row, j])
                used[best] = True
                box_tp += 1
    safe = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"tag_precision": safe(tag_tp, tag_pred), "tag_recall": safe(tag_tp, tag_true),
            "box_precision": safe(box_tp, box_pred), "box_recall": safe(box_tp, box_true),
            "box_recall_any_class": safe(agnostic_hit, box_true), "boxes_per_image": box_pred / max(len(store), 1)}


# ---------------------------------------------------------------------------------------- retrieval

class OwnCaptionEval:
    """Exact top-10 search of tag queries over one sentence store, scored against each image's own captions."""

    def __init__(self, text_dir: Path, retrieval_dir: Path, captions_json: Path):
        import pyarrow.parquet as pq

        sentences = pq.read_table(text_dir / "sentences.parquet", columns=["sentence_id", "text"]).to_pydict()
        self.embeddings = stage_embeddings(retrieval_dir / "embeddings", len(sentences["text"]))
        by_text = {" ".join(t.split()).lower(): int(s) for s, t in zip(sentences["sentence_id"], sentences["text"])}
        data = json.loads(captions_json.read_text(encoding="utf-8"))
        stem = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
        self.own: dict[str, set[int]] = {}
        for ann in data["annotations"]:
            sid = by_text.get(" ".join(ann["caption"].split()).lower())
            if sid is not None:
                self.own.setdefault(stem[ann["image_id"]], set()).add(sid)
        self.images = sorted(self.own)
        self._cache: dict[str, np.ndarray] = {}

    def _topk(self, queries: list[str]) -> list[np.ndarray]:
        new = sorted({q for q in queries if q and q not in self._cache})
        if new:
            emb = encoders.encode(new)
            scores = emb @ self.embeddings.T
            top = np.argsort(-scores, axis=1, kind="stable")[:, :max(KS)]
            self._cache.update(zip(new, top))
        return [self._cache[q] if q else np.zeros(0, np.int64) for q in queries]

    def hits(self, queries: dict[str, str]) -> np.ndarray:
        """[images, len(KS)] booleans: own caption within the top k."""
        tops = self._topk([queries.get(i, "") for i in self.images])
        return np.array([[bool(set(t[:k].tolist()) & self.own[i]) for k in KS] for i, t in zip(self.images, tops)])


def stage_embeddings(folder: Path, n_sentences: int) -> np.ndarray:
    """The retrieval stage's sentence embeddings (``embeddings/part-*.npy``, in sentence-id order)."""
    parts = [np.load(p) for p in sorted(folder.glob("part-*.npy"))]
    emb = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    if len(emb) != n_sentences:
        raise SystemExit(f"{folder} holds {len(emb)} sentence embeddings, the text store {n_sentences}")
    return emb


def bootstrap(hits: np.ndarray, seed: int = 0) -> list[tuple[float, float, float]]:
    """(mean, low, high) of each column, 95% percentile interval over images."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(hits), size=(BOOTSTRAP, len(hits)))
    means = hits[idx].mean(axis=1)
    return [(float(hits[:, c].mean()), float(np.percentile(means[:, c], 2.5)),
             float(np.percentile(means[:, c], 97.5))) for c in range(hits.shape[1])]


def queries_of(store: RegionStore, mode: str, min_score: float, whole_image_tag: bool) -> dict[str, str]:
    """Tag query per image as the retrieval stage builds it (its min_tag_score rule: the best tag always stays)."""
    out = {}
    for image in store:
        tags, scores = list(image.tags), np.asarray(image.scores, np.float32)
        if not whole_image_tag:
            tags, scores = tags[1:], scores[1:]
        keep = [t for t, s in zip(tags, scores) if (min_score <= 0 or s >= min_score) and t]
        if not keep and len(scores) and min_score > 0:
            keep = [tags[int(np.argmax(scores))]]
        out[str(image.image_id)] = make_query(keep, mode)
    return out


def fmt(ci: tuple[float, float, float]) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def prepare_text(data: Path, dataset: str, out: Path) -> tuple[Path, Path, Path]:
    """Sentence store = COCO pool + the image set's own captions; embeddings through the retrieval stage."""
    captions = data / dataset / ("captions_train2017.json" if dataset == "coco-mini" else "captions.json")
    pool = data / "text" / "coco_val2017_captions_pool.json"
    text_dir, probe = out / f"text_{dataset}", out / f"retrieval_probe_{dataset}"
    run_text(TextConfig(out=text_dir, corpus=[pool, captions]))
    return text_dir, probe, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_detectors")
    parser.add_argument("--backends", nargs="+", default=["proposals", "centernet", "coco-instances"])
    parser.add_argument("--datasets", nargs="+", default=["coco-mini", "flickr8k-750"])
    parser.add_argument("--hf-model", default=None, help="also benchmark the transformers backend on this model")
    parser.add_argument("--hf-vocabulary", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the regions stage")
    parser.add_argument("--query-threshold", type=float, default=None,
                        help="min_tag_score of the checked retrieval-stage run (default: best R@5 of the sweep)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier outputs first")
    args = parser.parse_args()
    os.environ.setdefault("MUVLA_NO_PROGRESS", "1")
    if args.hf_model is not None and "transformers" not in args.backends:
        args.backends.append("transformers")
    if not (args.data / "coco-mini").is_dir():
        raise SystemExit(f"{args.data}/coco-mini not found: this benchmark needs ../shared/data")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"threads": args.threads, "load_average_at_start": os.getloadavg(), "datasets": {}}
    labels, _ = coco_labels(args.data / "coco-mini" / "instances_train2017.json")

    for dataset in args.datasets:
        print(f"\n== {dataset}", flush=True)
        n_images = len(list((args.data / dataset / "images").glob("*.jpg")))
        stores: dict[str, Path] = {}
        speed: dict[str, dict] = {}
        for name in args.backends:
            out = args.out / f"regions_{dataset}_{name}"
            settings = backend_settings(name, args.data, dataset, out, args)
            if settings is None:
                continue
            stores[name] = out
            if (out / "index.parquet").exists():  # an earlier run's store (or one linked here): no speed figure
                continue
            result = run_regions_measured(settings, args.threads)
            speed[name] = {"images_per_s": n_images / result["wall_s"], "cpu_s_per_image": result["cpu_s"] / n_images,
                           "peak_rss_mb": result["peak_rss_mb"],
                           "mean_regions": result["summary"]["mean_regions_per_image"]}
            print(f"  regions {name}: {speed[name]['images_per_s']:.2f} images/s wall, "
                  f"{speed[name]['cpu_s_per_image']:.3f} CPU s/image, peak RSS {result['peak_rss_mb']:.0f} MB, "
                  f"{speed[name]['mean_regions']:.1f} regions/image", flush=True)
        entry: dict = {"speed": speed, "quality": {}, "retrieval": {}}
        if dataset == "coco-mini":
            for name, path in stores.items():
                store = RegionStore(path)
                entry["quality"][name] = {str(t): detection_quality(store, labels, t) for t in THRESHOLDS}

        text_dir, probe, captions = prepare_text(args.data, dataset, args.out)
        first = next(iter(stores.values()))
        run_retrieval(RetrievalConfig(out=probe, regions=first, text=text_dir, k=max(KS)))  # embeds all sentences
        evaluator = OwnCaptionEval(text_dir, probe, captions)
        print(f"  {len(evaluator.images)} images with own captions in "
              f"{len(evaluator.embeddings)} sentences", flush=True)
        for name, path in stores.items():
            store = RegionStore(path)
            curves: dict = {}
            for whole in (True, False):
                for mode in QUERY_MODES:
                    for t in THRESHOLDS:
                        ci = bootstrap(evaluator.hits(queries_of(store, mode, t, whole)))
                        curves[f"{'with' if whole else 'without'}_whole_image_tag/{mode}/{t}"] = ci
            entry["retrieval"][name] = curves
            best_t = args.query_threshold if args.query_threshold is not None else max(
                THRESHOLDS, key=lambda t: curves[f"with_whole_image_tag/counted/{t}"][1][0])
            for mode in QUERY_MODES:  # the same figure through the real retrieval stage
                stage_out = args.out / f"retrieval_{dataset}_{name}_{mode}_{best_t}"
                stage_out.mkdir(parents=True, exist_ok=True)
                if not (stage_out / "embeddings").exists():
                    (stage_out / "embeddings").symlink_to((probe / "embeddings").resolve(), target_is_directory=True)
                run_retrieval(RetrievalConfig(out=stage_out, regions=path, text=text_dir, k=max(KS),
                                              query_mode=mode, min_tag_score=best_t))
                entry["retrieval"][name][f"stage/{mode}/{best_t}"] = stage_recall(stage_out, evaluator)
        report["datasets"][dataset] = entry
        print_dataset(dataset, entry)
    (args.out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"\nresults: {args.out / 'results.json'}")


def stage_recall(stage_out: Path, evaluator: OwnCaptionEval) -> list[float]:
    import pyarrow.parquet as pq

    topk = pq.read_table(stage_out / "topk.parquet").to_pydict()
    ranked: dict[str, list[int]] = {}
    for image_id, _rank, sid in sorted(zip(topk["image_id"], topk["rank"], topk["sentence_id"])):
        ranked.setdefault(image_id, []).append(int(sid))
    return [float(np.mean([bool(set(ranked.get(i, [])[:k]) & evaluator.own[i]) for i in evaluator.images]))
            for k in KS]


def print_dataset(dataset: str, entry: dict) -> None:
    if entry["speed"]:
        print(f"\n### Regions stage speed, {dataset}")
        print("| backend | images/s | CPU s/image | peak RSS MB | regions/image |")
        print("|---|---|---|---|---|")
        for name, s in entry["speed"].items():
            print(f"| {name} | {s['images_per_s']:.2f} | {s['cpu_s_per_image']:.3f} | {s['peak_rss_mb']:.0f} | "
                  f"{s['mean_regions']:.1f} |")
    if entry["quality"]:
        print(f"\n### Tags and boxes vs COCO labels, {dataset} (score threshold on object regions)")
        print("| backend | threshold | tag P | tag R | box P@.5 | box R@.5 | box R@.5 any class | boxes/image |")
        print("|---|---|---|---|---|---|---|---|")
        for name, by_t in entry["quality"].items():
            for t, q in by_t.items():
                print(f"| {name} | {t} | {q['tag_precision']:.3f} | {q['tag_recall']:.3f} | {q['box_precision']:.3f} | "
                      f"{q['box_recall']:.3f} | {q['box_recall_any_class']:.3f} | {q['boxes_per_image']:.1f} |")
    print(f"\n### Own-caption recall, {dataset} (95% bootstrap interval over images)")
    print("| backend | whole-image tag | mode | min_tag_score | R@1 | R@5 | R@10 |")
    print("|---|---|---|---|---|---|---|")
    for name, curves in entry["retrieval"].items():
        for key, value in curves.items():
            if key.startswith("stage/"):
                _, mode, t = key.split("/")
                print(f"| {name} | (retrieval stage) | {mode} | {t} | " + " | ".join(f"{v:.3f}" for v in value) + " |")
                continue
            whole, mode, t = key.split("/")
            print(f"| {name} | {whole.split('_')[0]} | {mode} | {t} | " + " | ".join(fmt(c) for c in value) + " |")


if __name__ == "__main__":
    main()
