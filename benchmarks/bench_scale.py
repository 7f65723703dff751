"""Scale benchmark: every corpus stage at growing sizes, extrapolated to CC3M (3M images, 3M sentences, K = 5).

    python benchmarks/bench_scale.py [--out DIR] [--data ../shared/data] [--sizes 5000,20000]
        [--text-sizes 10000,200000,1000000,3000000] [--region-rows 10000,100000] [--index-sizes 100000] [--full]
        [--parts text,pipeline,lookup,regions,index]

Every measurement runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own;
"base" is the resident memory after imports and model loading, before any work. Parts:

- text: ``run_text`` on CC3M-format TSVs of N lines (the real CC3M validation captions, then the
  COCO val2017 pool, then numbered copies): sentences/s and peak RSS;
- pipeline (N sentences and N images, the CC3M ratio): ``run_retrieval`` end to end (K = 5, Flat,
  official queries) on a region store whose images carry 3-10 COCO class tags drawn by COCO
  frequency, then ``run_phrases`` on its 5N pairs: encode sentences/s, queries/s, parse
  sentences/s, distinct strings encoded/s, pairs matched/s; then, in one process and interleaved
  chunk by chunk (same load for both), the retrieval stage's sentence encoding against the phrases
  stage's distinct-string encoding;
- lookup: ``TextOutput.texts`` of 512 retrieved ids (one phrases parse unit) on a 1M-sentence store,
  against a full-scan reference (what it did before row-group pruning) in the same process;
- regions: ``run_regions`` with the vinvl-tsv backend on generated VinVL files (2054-d float32
  base64 features, --region-boxes boxes per row, .lineidx files as the releases ship them):
  rows/s and peak RSS at each size;
- index: N random unit vectors (d = 384) stored as the retrieval stage's float16 embedding units,
  indexed by the stage's own ``build_index`` / ``set_search_params`` for several factory strings:
  build seconds, search seconds per 1k queries, index memory, recall@5 against the exact (Flat)
  top-5 and the approximate top-5's mean cosine over the exact one's. Two distributions: uniform
  on the sphere (no structure: the worst case for approximate search) and "fit", a Gaussian with
  the mean and covariance of real MiniLM embeddings of CC3M/COCO captions, normalised (the real
  spectrum, effective dimension ~100 instead of 384, but no clusters or near-duplicates, so still
  pessimistic). The old in-memory index build (all units concatenated to float32, then the kept
  rows copied) is measured at sizes up to 1M as the memory reference.

Results: ``<out>/results.json`` and ``<out>/results.md`` (tables, the CC3M extrapolation). The
extrapolation multiplies measured rates by CC3M counts; the GPU column states its assumption per
row. Absolute figures depend on machine load (the load average is recorded per measurement);
ratios measured in one process carry over. Generated inputs live under ``<out>/work`` and the big
ones (VinVL files, index units) are deleted after use.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

CC3M_IMAGES = 3_000_000
CC3M_SENTENCES = 3_000_000
CC3M_K = 5
DIM = 384
N_QUERIES = 1000
RECALL_K = 5
VINVL_DIM = 2054  # VinVL features.tsv rows: 2048-d feature + 6 box-position values per region
# (factory string, searches): a search is (label, nprobe, HNSW efSearch or None = what the stage sets)
INDEXES: list[tuple[str, list[tuple[str, int, int | None]]]] = [
    ("Flat", [("exact", 1, None)]),
    ("IVF4096,Flat", [("nprobe 16", 16, None), ("nprobe 64", 64, None), ("nprobe 256", 256, None)]),
    ("IVF4096,SQ8", [("nprobe 64", 64, None), ("nprobe 256", 256, None)]),
    # "np": no polysemous training (5x slower to train and no use for inner-product search); OPQ32 is
    # left out: its rotation took 500 s to train on 20k vectors here
    ("IVF4096,PQ32np", [("nprobe 64", 64, None), ("nprobe 256", 256, None)]),
    ("HNSW32", [("efSearch 16 (stage)", 1, None), ("efSearch 128", 1, 128)]),
]
# One GPU: all-MiniLM-L6-v2 encodes 14,200 sentences/s on one V100 (sentence-transformers' published
# model table); CPU work on a GPU machine is taken as 8 idle cores = 4x this machine's 2 cores
# (sharded processes), with no credit for the load on this machine, so the estimate is conservative.
GPU_SBERT_PER_S = 14_200.0
GPU_CPU_FACTOR = 4.0


# ---------------------------------------------------------------------------------------------- helpers

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current resident memory (Linux /proc; peak is ru_maxrss)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def caption_pool(data: Path) -> list[str]:
    """Real captions: CC3M validation first (the target corpus), then the COCO val2017 pool."""
    cc3m = [line.split("\t", 1)[0] for line in
            (data / "text" / "cc3m_validation.tsv").read_text(encoding="utf-8").splitlines()]
    pool = json.loads((data / "text" / "coco_val2017_captions_pool.json").read_text(encoding="utf-8"))
    return [c for c in cc3m + [a["caption"] for a in pool["annotations"]] if c.strip()]


def write_cc3m_tsv(path: Path, data: Path, n: int) -> None:
    """N lines ``caption<TAB>url``; past the real captions, numbered copies (distinct, so not deduplicated)."""
    pool = caption_pool(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            copy, j = divmod(i, len(pool))
            caption = " ".join(pool[j].split()) + (f" ({copy})" if copy else "")
            f.write(f"{caption}\thttp://example.invalid/{i}.jpg\n")


def coco_classes(data: Path) -> tuple[list[str], np.ndarray]:
    """COCO class names and their box frequencies in coco-mini (add-one smoothed)."""
    inst = json.loads((data / "coco-mini" / "instances_train2017.json").read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in inst["categories"]}
    counts = {cid: 1.0 for cid in names}
    for ann in inst["annotations"]:
        counts[ann["category_id"]] = counts.get(ann["category_id"], 1.0) + 1.0
    ids = sorted(names)
    p = np.array([counts[i] for i in ids])
    return [names[i] for i in ids], p / p.sum()


# ---------------------------------------------------------------------------------------------- workers

def job_text(job: dict[str, Any]) -> dict[str, Any]:
    from muvla.text.stage import TextConfig, run_text

    work = Path(job["work"])
    corpus = work / "corpus.tsv"
    write_cc3m_tsv(corpus, Path(job["data"]), job["n"])
    base = rss_mb()
    t0 = time.perf_counter()
    summary = run_text(TextConfig(out=work / "text", corpus=[corpus], format="cc3m", overwrite=True))
    seconds = time.perf_counter() - t0
    return {"lines": job["n"], "sentences": summary["sentences"], "seconds": seconds,
            "sentences_per_s": job["n"] / seconds, "base_rss_mb": base}


def job_pipeline_prep(job: dict[str, Any]) -> dict[str, Any]:
    """Text store and region store of N sentences / N images (not measured)."""
    from muvla.corpus.region_store import ImageRegions
    from muvla.corpus.synthetic import write_region_store
    from muvla.text.stage import TextConfig, run_text

    work, data, n = Path(job["work"]), Path(job["data"]), job["n"]
    write_cc3m_tsv(work / "corpus.tsv", data, n)
    run_text(TextConfig(out=work / "text", corpus=[work / "corpus.tsv"], format="cc3m", overwrite=True))
    names, p = coco_classes(data)
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        r = int(rng.integers(3, 11))
        cls = rng.choice(len(names), size=r, p=p).astype(np.int32)
        xy = rng.uniform(0, 300, (r, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(20, 300, (r, 2)).astype(np.float32)], axis=1)
        images.append(ImageRegions(f"img{i:07d}", f"img{i:07d}.jpg", 640, 640, boxes, [names[c] for c in cls],
                                   np.ones(r, np.float32), cls, np.zeros((r, 4), np.float16)))
    write_region_store(work / "regions", images, names, max_regions=10, images_per_part=1000)
    return {}


def job_retrieval(job: dict[str, Any]) -> dict[str, Any]:
    from muvla import encoders
    from muvla.retrieval.stage import RetrievalConfig, run_retrieval

    work = Path(job["work"])
    encoders.get_encoder()  # loaded before timing, as in any long-running process
    encoders.load_sentence_encoder()
    base = rss_mb()
    t0 = time.perf_counter()
    summary = run_retrieval(RetrievalConfig(out=work / "retrieval", regions=work / "regions", text=work / "text",
                                            k=CC3M_K, overwrite=True))
    seconds = time.perf_counter() - t0
    keys = ("sentences", "encode_sentences_per_s", "encode_seconds", "index_seconds", "query_seconds",
            "queries_per_s", "queries", "unique_queries", "images")
    return {**{k: summary[k] for k in keys}, "distinct_retrieved": summary["hubness"]["distinct_sentences_retrieved"],
            "pairs": summary["queries"] * CC3M_K, "seconds": seconds, "base_rss_mb": base}


def _interleaved(sentences: list[str], strings: list[str], rounds: int = 4) -> dict[str, Any]:
    """Sentence encoding (retrieval settings) and distinct-string encoding (phrases settings),
    alternating chunk by chunk in this process so both see the same load."""
    from muvla import encoders
    from muvla.phrases.stage import PhrasesSettings
    from muvla.retrieval.stage import RetrievalSettings

    sent_batch = RetrievalSettings().encode_batch_size
    str_batch = PhrasesSettings().batch_size
    s_chunk, p_chunk = len(sentences) // rounds, len(strings) // rounds
    t_sent = t_str = 0.0
    ratios = []
    for r in range(rounds):
        t0 = time.perf_counter()
        encoders.encode(sentences[r * s_chunk:(r + 1) * s_chunk], batch_size=sent_batch)
        t1 = time.perf_counter()
        encoders.encode(strings[r * p_chunk:(r + 1) * p_chunk], batch_size=str_batch)
        t2 = time.perf_counter()
        t_sent += t1 - t0
        t_str += t2 - t1
        ratios.append((p_chunk / (t2 - t1)) / (s_chunk / (t1 - t0)))
    tok = encoders.load_wordpiece_tokenizer()

    def mean_tokens(texts: list[str]) -> float:
        return float(np.mean([len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]))

    return {"sentences": s_chunk * rounds, "strings": p_chunk * rounds,
            "sentences_per_s": s_chunk * rounds / t_sent, "strings_per_s": p_chunk * rounds / t_str,
            "ratio_median": float(np.median(ratios)), "sentence_tokens": mean_tokens(sentences),
            "string_tokens": mean_tokens(strings)}


def job_phrases(job: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from muvla import encoders
    from muvla.corpus.layout import RegionsOutput, TextOutput
    from muvla.phrases.stage import PhrasesConfig, run_phrases

    work = Path(job["work"])
    encoders.get_encoder()
    encoders.load_sentence_encoder()
    encoders.load_spacy()
    encoders.load_wordpiece_tokenizer()
    base = rss_mb()
    t0 = time.perf_counter()
    summary = run_phrases(PhrasesConfig(out=work / "phrases", retrieval=work / "retrieval", overwrite=True))
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "base_rss_mb": base, "pairs": summary["pairs"], "strings": summary["strings"],
           "sentences_parsed": summary["sentences_parsed"],
           "parse_sentences_per_s": summary["sentences_parsed_now"] / summary["parse_seconds"],
           "strings_per_s": summary["strings_encoded_now"] / summary["encode_seconds"],
           "pairs_per_s": summary["pairs_matched_now"] / summary["match_seconds"],
           "parse_seconds": summary["parse_seconds"], "encode_seconds": summary["encode_seconds"],
           "match_seconds": summary["match_seconds"]}
    out["peak_rss_stage_mb"] = peak_rss_mb()
    # side by side: the retrieved sentences against the distinct strings, in this process
    table = pq.read_table(work / "phrases" / "sentence_phrases.parquet", columns=["sentence_id", "phrases"])
    ids = table.column("sentence_id").to_pylist()
    strings = {p for row in table.column("phrases").to_pylist() for p in row}
    strings.update(t for tags in RegionsOutput(work / "regions").image_tags()[1] for t in tags if t.strip())
    rng = np.random.default_rng(0)
    wanted = sorted(rng.choice(ids, size=min(len(ids), job["side_sentences"]), replace=False).tolist())
    texts = TextOutput(work / "text").texts(wanted)
    pool = sorted(strings)
    pick = rng.choice(len(pool), size=min(len(pool), job["side_strings"]), replace=False)
    out["side_by_side"] = _interleaved([texts[i] for i in wanted], [pool[i] for i in pick])
    return out


def job_lookup(job: dict[str, Any]) -> dict[str, Any]:
    """One phrases parse unit's text lookup on a big store: row-group pruned vs full scan."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from muvla.corpus.layout import TextOutput
    from muvla.corpus.synthetic import write_sentence_store

    work, n = Path(job["work"]), job["n"]
    pool = caption_pool(Path(job["data"]))
    write_sentence_store(work / "text", (f"{pool[i % len(pool)]} ({i // len(pool)})" for i in range(n)))
    text = TextOutput(work / "text")
    rng = np.random.default_rng(0)
    retrieved = np.unique(rng.choice(n, size=n // 3, replace=False))  # a third of the corpus retrieved
    units = [retrieved[s:s + 512] for s in rng.choice(len(retrieved) - 512, size=job["calls"], replace=False)]

    def full_scan(ids: list[int]) -> dict[int, str]:
        value_set = pa.array(ids, type=pa.int64())
        found: dict[int, str] = {}
        for batch in pq.ParquetFile(text.sentences).iter_batches(columns=["sentence_id", "text"], batch_size=65536):
            t = pa.Table.from_batches([batch])
            t = t.filter(pc.is_in(t.column("sentence_id"), value_set=value_set))
            found.update(zip(t.column("sentence_id").to_pylist(), t.column("text").to_pylist()))
        return found

    t_new = t_ref = 0.0
    for unit in units:
        ids = unit.tolist()
        t0 = time.perf_counter()
        a = text.texts(ids)
        t1 = time.perf_counter()
        b = full_scan(ids)
        t2 = time.perf_counter()
        if a != b:
            raise RuntimeError("pruned lookup differs from the full scan")
        t_new += t1 - t0
        t_ref += t2 - t1
    groups = pq.ParquetFile(text.sentences).metadata.num_row_groups
    shutil.rmtree(work / "text")
    return {"sentences": n, "row_groups": groups, "calls": len(units), "ms_per_call": 1000 * t_new / len(units),
            "reference_ms_per_call": 1000 * t_ref / len(units), "speedup": t_ref / t_new}


def job_regions_prep(job: dict[str, Any]) -> dict[str, Any]:
    """VinVL features.tsv / predictions.tsv / .lineidx with N rows of B boxes (16 distinct feature blobs)."""
    work, n, boxes = Path(job["work"]), job["n"], job["boxes"]
    work.mkdir(parents=True, exist_ok=True)
    names, _ = coco_classes(Path(job["data"]))
    rng = np.random.default_rng(0)
    blobs = [base64.b64encode(rng.standard_normal((boxes, VINVL_DIM)).astype(np.float32).tobytes()).decode("ascii")
             for _ in range(16)]
    with open(work / "features.tsv", "w", encoding="ascii") as ff, \
            open(work / "predictions.tsv", "w", encoding="utf-8") as fp, \
            open(work / "features.lineidx", "w", encoding="ascii") as fi, \
            open(work / "predictions.lineidx", "w", encoding="ascii") as pi:
        for i in range(n):
            image_id = f"{i:09d}"
            fi.write(f"{ff.tell()}\n")
            ff.write(f"{image_id}\t{boxes}\t{blobs[i % len(blobs)]}\n")
            objects = [{"rect": [10.0 * b, 5.0 * b, 10.0 * b + 50, 5.0 * b + 60], "class": names[(i + 7 * b) % len(names)],
                        "conf": round(0.95 - 0.05 * b, 3)} for b in range(boxes)]
            pi.write(f"{fp.tell()}\n")
            fp.write(f"{image_id}\t" + json.dumps({"image_h": 480, "image_w": 640, "num_boxes": boxes,
                                                   "objects": objects}) + "\n")
    return {"features_mb": (work / "features.tsv").stat().st_size / 2**20}


def job_regions(job: dict[str, Any]) -> dict[str, Any]:
    from muvla.regions.stage import RegionsConfig, run_regions

    work = Path(job["work"])
    base = rss_mb()
    t0 = time.perf_counter()
    summary = run_regions(RegionsConfig(out=work / "regions", backend="vinvl-tsv",
                                        vinvl_features=work / "features.tsv",
                                        vinvl_predictions=work / "predictions.tsv",
                                        max_regions=job["boxes"], progress=False, overwrite=True))
    seconds = time.perf_counter() - t0
    mb = (work / "features.tsv").stat().st_size / 2**20
    return {"rows": summary["images_written"], "seconds": seconds, "rows_per_s": summary["images_written"] / seconds,
            "tsv_mb_per_s": mb / seconds, "base_rss_mb": base}


def _fit_gaussian(real_dirs: list[str], data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Cholesky factor of real MiniLM caption embeddings (the pipeline's units, else 3,000 encoded)."""
    parts = [np.load(p).astype(np.float32) for d in real_dirs for p in sorted(Path(d).glob("part-*.npy"))]
    if parts:
        emb = np.concatenate(parts)
    else:
        from muvla import encoders

        emb = encoders.encode(caption_pool(data)[:3000])
    cov = np.cov(emb.T) + 1e-6 * np.eye(emb.shape[1])
    return emb.mean(axis=0), np.linalg.cholesky(cov)


def _draw(rng: np.random.Generator, m: int, fit: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    x = rng.standard_normal((m, DIM), dtype=np.float32)
    if fit is not None:
        x = (fit[0] + x @ fit[1].T).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def job_index_prep(job: dict[str, Any]) -> dict[str, Any]:
    """N vectors as the retrieval stage's float16 units, plus 1,000 float32 queries of the same law."""
    from muvla.retrieval.stage import RetrievalSettings
    from muvla.utils.shards import unit_ranges

    work, n = Path(job["work"]), job["n"]
    fit = _fit_gaussian(job["real"], Path(job["data"])) if job["dist"] == "fit" else None
    (work / "embeddings").mkdir(parents=True, exist_ok=True)
    for u, (start, stop) in enumerate(unit_ranges(n, RetrievalSettings().unit_size)):
        rng = np.random.default_rng([job["seed"], u])
        np.save(work / "embeddings" / f"part-{u:05d}.npy", _draw(rng, stop - start, fit).astype(np.float16))
    np.save(work / "queries.npy", _draw(np.random.default_rng([job["seed"], 2**31]), N_QUERIES, fit))
    return {}


def _unit_plan(work: Path, n: int) -> Any:
    from muvla.retrieval.stage import RetrievalSettings
    from muvla.utils.shards import UnitPlan, resolve_shard, unit_ranges

    return UnitPlan(work / "embeddings", "part", len(unit_ranges(n, RetrievalSettings().unit_size)),
                    resolve_shard(0, 1), ".npy")


def _true_cosines(plan: Any, unit_size: int, queries: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Exact cosine of each returned neighbour (PQ indexes return approximate scores); 0 where none."""
    units = [np.load(plan.path(u), mmap_mode="r") for u in range(plan.n_units)]
    out = np.zeros(labels.shape, dtype=np.float32)
    for (qi, r), label in np.ndenumerate(labels):
        if label >= 0:
            out[qi, r] = float(queries[qi] @ units[label // unit_size][label % unit_size].astype(np.float32))
    return out


def job_index(job: dict[str, Any]) -> dict[str, Any]:
    """Build one index through the stage's code, search the queries with each setting."""
    import faiss

    from muvla.retrieval.stage import RetrievalSettings, build_index, kept_unit_blocks, set_search_params

    work, n, spec = Path(job["work"]), job["n"], job["spec"]
    settings = RetrievalSettings()
    plan = _unit_plan(work, n)
    keep = np.arange(n, dtype=np.int64)
    queries = np.load(work / "queries.npy")
    base = rss_mb()
    t0 = time.perf_counter()
    index = build_index(lambda: kept_unit_blocks(plan, n, settings.unit_size, keep), n, spec, settings.train_size)
    build_s = time.perf_counter() - t0
    rss_after = rss_mb()
    faiss.write_index(index, str(work / "index.faiss"))  # its size on disk = what it holds in memory
    index_mb = (work / "index.faiss").stat().st_size / 2**20
    (work / "index.faiss").unlink()
    exact = np.load(work / "exact.npy") if spec != "Flat" else None
    searches = []
    for label, nprobe, ef in job["searches"]:
        set_search_params(index, nprobe, RECALL_K)
        if ef is not None:
            faiss.downcast_index(index).hnsw.efSearch = ef
        search_s, spent = float("inf"), 0.0
        for _ in range(3):  # best of up to 3 (a single search is noisy on a shared machine), within ~20 s
            t0 = time.perf_counter()
            scores, labels = index.search(queries, RECALL_K)
            search_s = min(search_s, time.perf_counter() - t0)
            spent += time.perf_counter() - t0
            if spent > 20:
                break
        if spec == "Flat":
            np.save(work / "exact.npy", labels)
            np.save(work / "exact_scores.npy", scores)
            recall, cos_ratio = 1.0, 1.0
        else:
            recall = float(np.mean([len(set(a) & set(b)) / RECALL_K for a, b in zip(labels, exact)]))
            cos_ratio = float(_true_cosines(plan, settings.unit_size, queries, labels).mean()
                              / np.load(work / "exact_scores.npy").mean())
        searches.append({"search": label, "s_per_1k_queries": search_s * 1000 / len(queries), "recall": recall,
                         "cos_ratio": cos_ratio})
    return {"spec": spec, "n": n, "build_s": build_s, "index_mb": index_mb, "base_rss_mb": base,
            "rss_after_build_mb": rss_after, "searches": searches}


def job_index_reference(job: dict[str, Any]) -> dict[str, Any]:
    """The index build as the stage did it before: every unit concatenated to float32, the kept rows
    copied, then added (memory reference for the streamed build)."""
    import faiss

    from muvla.retrieval.stage import RetrievalSettings
    from muvla.utils.shards import unit_ranges

    work, n = Path(job["work"]), job["n"]
    plan = _unit_plan(work, n)
    keep = np.arange(n, dtype=np.int64)
    base = rss_mb()
    t0 = time.perf_counter()
    parts = [np.load(plan.path(u)) for u in range(len(unit_ranges(n, RetrievalSettings().unit_size)))]
    emb = np.ascontiguousarray(np.concatenate(parts).astype(np.float32))
    index = faiss.IndexFlatIP(DIM)
    index.add(emb[keep])
    return {"spec": "Flat (before: in memory)", "n": n, "build_s": time.perf_counter() - t0,
            "index_mb": index.ntotal * DIM * 4 / 2**20, "base_rss_mb": base, "rss_after_build_mb": rss_mb(),
            "searches": []}


def job_detector(job: dict[str, Any]) -> dict[str, Any]:
    """The default image backend (CenterNet when its weights are cached, else the ImageNet fallback)
    on a few real photos; the fallback's CPU-only proposal share is timed apart."""
    from muvla.regions.images import list_images, load_rgb
    from muvla.regions.proposals import propose_boxes
    from muvla.regions.stage import RegionsConfig, run_regions

    work = Path(job["work"])
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    source = sorted((Path(job["data"]) / "coco-mini" / "images").glob("*.jpg"))[:job["n"]]
    for path in source:
        shutil.copy(path, images / path.name)
    warm = work / "warm-up"
    warm.mkdir()
    shutil.copy(source[0], warm / source[0].name)
    run_regions(RegionsConfig(out=work / "regions-warm-up", images=warm, progress=False, overwrite=True))
    base = rss_mb()
    t0 = time.perf_counter()
    summary = run_regions(RegionsConfig(out=work / "regions", images=images, progress=False, overwrite=True))
    seconds = time.perf_counter() - t0
    proposal_s = 0.0
    if summary["backend"] == "proposals":  # only the ImageNet fallback proposes boxes on the CPU
        cfg = RegionsConfig(out=work / "unused", images=images)
        t0 = time.perf_counter()
        for path in list_images(images):
            propose_boxes(load_rgb(path), cfg.proposal_config())
        proposal_s = time.perf_counter() - t0
    return {"images": len(source), "seconds": seconds, "images_per_s": len(source) / seconds,
            "backend": summary["backend"], "proposal_share": proposal_s / seconds, "base_rss_mb": base}


JOBS = {"text": job_text, "pipeline_prep": job_pipeline_prep, "retrieval": job_retrieval, "phrases": job_phrases,
        "lookup": job_lookup, "regions_prep": job_regions_prep, "regions": job_regions,
        "index_prep": job_index_prep, "index": job_index, "index_reference": job_index_reference,
        "detector": job_detector}


def worker(job: dict[str, Any]) -> None:
    load0 = load_avg()
    t0 = time.perf_counter()
    result = JOBS[job["kind"]](job)
    result.update(peak_rss_mb=peak_rss_mb(), load_start=load0, load_end=load_avg(),
                  job_seconds=time.perf_counter() - t0)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- driver

class Runner:
    """Runs each job in a fresh interpreter (its own peak RSS) and logs its stderr under <out>/logs."""

    def __init__(self, out: Path, data: Path) -> None:
        self.out, self.data = out, data
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, kind: str, name: str, **job: Any) -> dict[str, Any]:
        job = {"kind": kind, "data": str(self.data), **job}
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load {load_avg()})", flush=True)
        env = {**os.environ, "MUVLA_NO_PROGRESS": "1"}
        with open(self.out / "logs" / f"{name}.log", "w", encoding="utf-8") as log:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], stdout=subprocess.PIPE,
                                  stderr=log, text=True, env=env, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {self.out / 'logs' / (name + '.log')}")
        result = json.loads(lines[-1][len("RESULT "):])
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k != "searches"}
        print(f"    {shown}", flush=True)
        for s in result.get("searches", []):
            print(f"    {s}", flush=True)
        return result


def run_index_part(run: Runner, work: Path, sizes: list[int], hnsw_max: int, real: list[str]) -> list[dict]:
    rows = []
    for dist in ("uniform", "fit"):
        for n in sizes:
            folder = work / f"index-{dist}-{n}"
            run("index_prep", f"index-prep-{dist}-{n}", work=str(folder), n=n, dist=dist, seed=1, real=real)
            if dist == "uniform" and n <= 1_000_000:
                rows.append({"dist": dist, **run("index_reference", f"index-reference-{n}", work=str(folder), n=n)})
            for spec, searches in INDEXES:
                if spec.startswith("HNSW") and n > hnsw_max:
                    continue
                result = run("index", f"index-{dist}-{n}-{spec.replace(',', '_')}", work=str(folder), n=n,
                             spec=spec, searches=searches)
                rows.append({"dist": dist, **result})
            shutil.rmtree(folder)
    return rows


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"


def extrapolate(res: dict[str, Any]) -> list[dict[str, Any]]:
    """CC3M wall time per stage on this machine and on one GPU (assumptions in each row)."""
    rows: list[dict[str, Any]] = []
    pipe = res.get("pipeline", [])
    if res.get("text"):
        t = res["text"][-1]
        rows.append({"stage": "text", "work": f"{CC3M_SENTENCES:,} lines", "rate": t["sentences_per_s"], "unit": "lines/s",
                     "count": CC3M_SENTENCES, "gpu_rate": t["sentences_per_s"],
                     "gpu_note": "CPU, one process: no speed-up assumed"})
    if res.get("regions"):
        r = res["regions"][-1]
        rows.append({"stage": f"regions (vinvl-tsv import, {r['boxes']} boxes/row)", "work": f"{CC3M_IMAGES:,} rows",
                     "rate": r["rows_per_s"], "unit": "rows/s", "count": CC3M_IMAGES,
                     "gpu_rate": r["rows_per_s"] * GPU_CPU_FACTOR,
                     "gpu_note": f"CPU (base64, I/O), sharded: x{GPU_CPU_FACTOR:g}"})
    if res.get("detector"):
        d = res["detector"]
        share = d["proposal_share"]
        # proposals (fallback only) stay on CPU (x4 cores); the networks are assumed 50x faster on one GPU
        gpu_time = share / GPU_CPU_FACTOR + (1 - share) / 50.0
        backend = d.get("backend", "proposals")
        note = (f"proposals ({100 * share:.0f}% of the time) CPU x{GPU_CPU_FACTOR:g}; " if share else "") + \
            "detector + EfficientNet-Lite0 crops x50 on GPU (assumed)"
        rows.append({"stage": f"regions ({backend} backend, instead of vinvl-tsv)", "work": f"{CC3M_IMAGES:,} images",
                     "rate": d["images_per_s"], "unit": "images/s", "count": CC3M_IMAGES,
                     "gpu_rate": d["images_per_s"] / gpu_time, "gpu_note": note, "alternative": True})
    if pipe:
        p = pipe[-1]
        ret, phr = p["retrieval"], p["phrases"]
        frac = ret["distinct_retrieved"] / ret["sentences"]
        distinct = frac * CC3M_SENTENCES
        strings = phr["strings"] / phr["sentences_parsed"] * distinct
        unique_q = ret["unique_queries"] / ret["images"] * CC3M_IMAGES
        rows.append({"stage": "retrieval: encode sentences", "work": f"{CC3M_SENTENCES:,} sentences",
                     "rate": ret["encode_sentences_per_s"], "unit": "sentences/s", "count": CC3M_SENTENCES,
                     "gpu_rate": GPU_SBERT_PER_S, "gpu_note": "published all-MiniLM-L6-v2 V100 rate"})
        rows.append({"stage": "retrieval: encode queries", "work": f"{unique_q:,.0f} distinct queries",
                     "rate": ret["queries_per_s"], "unit": "queries/s", "count": unique_q,
                     "gpu_rate": GPU_SBERT_PER_S, "gpu_note": "as sentences (queries are shorter)"})
        search = _search_row(res, unique_q)
        if search:
            rows.append(search)
        rows.append({"stage": "phrases: parse", "work": f"{distinct:,.0f} distinct retrieved sentences "
                                                        f"({100 * frac:.0f}% of the corpus, as measured)",
                     "rate": phr["parse_sentences_per_s"], "unit": "sentences/s", "count": distinct,
                     "gpu_rate": phr["parse_sentences_per_s"] * GPU_CPU_FACTOR,
                     "gpu_note": f"spaCy on CPU, sharded: x{GPU_CPU_FACTOR:g}"})
        rows.append({"stage": "phrases: encode distinct tags + phrases", "work": f"{strings:,.0f} strings "
                                                                                "(measured strings per sentence)",
                     "rate": phr["strings_per_s"], "unit": "strings/s", "count": strings,
                     "gpu_rate": GPU_SBERT_PER_S, "gpu_note": "as sentences (phrases are shorter)"})
        pairs = CC3M_IMAGES * CC3M_K
        rows.append({"stage": "phrases: match regions", "work": f"{pairs:,} pairs", "rate": phr["pairs_per_s"],
                     "unit": "pairs/s", "count": pairs, "gpu_rate": phr["pairs_per_s"] * GPU_CPU_FACTOR,
                     "gpu_note": f"CPU, sharded: x{GPU_CPU_FACTOR:g}"})
    for row in rows:
        row["cpu_s"] = row["count"] / row["rate"]
        row["gpu_s"] = row["count"] / row["gpu_rate"]
    return rows


def _search_row(res: dict[str, Any], unique_q: float) -> dict[str, Any] | None:
    """Index build + search of every query at 3M (measured if --full, else scaled linearly from the largest size)."""
    index_rows = [r for r in res.get("index", []) if r["dist"] == "uniform" and r["searches"]]
    if not index_rows:
        return None
    n_max = max(r["n"] for r in index_rows)
    scale = CC3M_SENTENCES / n_max
    chosen = {}
    for spec, label in (("Flat", "exact"), ("IVF4096,Flat", "nprobe 64")):
        row = next((r for r in index_rows if r["n"] == n_max and r["spec"] == spec), None)
        if row is None:
            continue
        s = next(s for s in row["searches"] if s["search"] == label)
        # search cost is linear in the index size for Flat and IVF (fixed nprobe / nlist)
        chosen[spec] = row["build_s"] * scale + s["s_per_1k_queries"] * scale * unique_q / 1000
    if not chosen:
        return None
    spec = "IVF4096,Flat" if "IVF4096,Flat" in chosen else "Flat"
    note = "" if n_max == CC3M_SENTENCES else f" (scaled from {n_max:,})"
    flat = f"; Flat would take {hours(chosen['Flat'])}" if "Flat" in chosen and spec != "Flat" else ""
    return {"stage": f"retrieval: build {spec} + search (nprobe 64){note}",
            "work": f"{unique_q:,.0f} queries over 3M{flat}", "rate": unique_q / chosen[spec], "unit": "queries/s",
            "count": unique_q, "gpu_rate": unique_q / chosen[spec] * GPU_CPU_FACTOR,
            "gpu_note": f"faiss on CPU in muvla: x{GPU_CPU_FACTOR:g} cores"}


def markdown(res: dict[str, Any]) -> str:
    out = [f"# bench_scale ({res['started']}, {res['cpus']} CPUs, load average {res['load_start']} at start, "
           f"{res['load_end']} at end)", ""]
    if res.get("text"):
        out += ["## text stage", "| lines | sentences kept | lines/s | peak RSS MB |", "|---|---|---|---|"]
        out += [f"| {r['lines']:,} | {r['sentences']:,} | {fmt(r['sentences_per_s'])} | {fmt(r['peak_rss_mb'])} |"
                for r in res["text"]]
        out.append("")
    for p in res.get("pipeline", []):
        ret, phr = p["retrieval"], p["phrases"]
        side = phr["side_by_side"]
        out += [f"## retrieval + phrases at {p['n']:,} sentences, {p['n']:,} images, {ret['pairs']:,} pairs",
                "| step | rate | peak RSS MB |", "|---|---|---|",
                f"| retrieval: encode sentences | {fmt(ret['encode_sentences_per_s'])} sentences/s | "
                f"{fmt(ret['peak_rss_mb'])} |",
                f"| retrieval: encode + search queries (Flat) | {fmt(ret['queries_per_s'])} queries/s "
                f"({ret['unique_queries']:,} distinct) | |",
                f"| phrases: parse | {fmt(phr['parse_sentences_per_s'])} sentences/s "
                f"({phr['sentences_parsed']:,} distinct sentences) | {fmt(phr['peak_rss_stage_mb'])} |",
                f"| phrases: encode distinct tags + phrases | {fmt(phr['strings_per_s'])} strings/s "
                f"({phr['strings']:,} strings) | |",
                f"| phrases: match | {fmt(phr['pairs_per_s'])} pairs/s | |",
                f"| side by side, one process, interleaved: sentences (batch 128) | {fmt(side['sentences_per_s'])} "
                f"sentences/s ({side['sentence_tokens']:.1f} tokens) | |",
                f"| side by side: distinct strings (batch 256) | {fmt(side['strings_per_s'])} strings/s "
                f"({side['string_tokens']:.1f} tokens), x{side['ratio_median']:.2f} the sentence rate | |", ""]
    if res.get("lookup"):
        r = res["lookup"]
        out += [f"## text lookup of one phrases parse unit (512 ids) on {r['sentences']:,} sentences "
                f"({r['row_groups']} row groups)",
                f"{fmt(r['ms_per_call'], 1)} ms per call with row-group pruning, {fmt(r['reference_ms_per_call'], 1)} ms "
                f"with the full scan it replaced (x{r['speedup']:.1f}, same process)", ""]
    if res.get("regions"):
        out += ["## regions: vinvl-tsv import", "| rows | boxes/row | features.tsv MB | rows/s | MB/s | peak RSS MB |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['rows']:,} | {r['boxes']} | {fmt(r['features_mb'])} | {fmt(r['rows_per_s'])} | "
                f"{fmt(r['tsv_mb_per_s'])} | {fmt(r['peak_rss_mb'])} |" for r in res["regions"]]
        out.append("")
    if res.get("detector"):
        d = res["detector"]
        out += [f"{d.get('backend', 'proposals')} backend: {fmt(d['images_per_s'], 2)} images/s on {d['images']} coco-mini photos "
                f"(proposals {100 * d['proposal_share']:.0f}% of the time), peak RSS {fmt(d['peak_rss_mb'])} MB", ""]
    if res.get("index"):
        out += ["## FAISS index (d = 384, 1,000 queries, recall@5 against Flat)",
                "| data | N | index | build s | index MB | search | s / 1k queries | recall@5 | top-5 cos / exact |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in res["index"]:
            searches = r["searches"] or [{"search": "-", "s_per_1k_queries": None, "recall": None, "cos_ratio": None}]
            for s in searches:
                out.append(f"| {r['dist']} | {r['n']:,} | {r['spec']} | {fmt(r['build_s'], 1)} | {fmt(r['index_mb'])} | "
                           f"{s['search']} | {fmt(s['s_per_1k_queries'], 2)} | {fmt(s['recall'], 3)} | "
                           f"{fmt(s['cos_ratio'], 3)} |")
        out.append("")
    if res.get("cc3m"):
        out += ["## CC3M extrapolation (3M images, 3M sentences, K = 5)",
                "| stage | work | measured rate | this machine | one GPU (estimate) | GPU assumption |",
                "|---|---|---|---|---|---|"]
        for r in res["cc3m"]:
            out.append(f"| {r['stage']} | {r['work']} | {fmt(r['rate'], 1)} {r['unit']} | {hours(r['cpu_s'])} | "
                       f"{hours(r['gpu_s'])} | {r['gpu_note']} |")
        main = [r for r in res["cc3m"] if not r.get("alternative")]  # the detector row replaces the TSV import
        if main:
            out.append(f"| **total** (vinvl-tsv regions) | | | **{hours(sum(r['cpu_s'] for r in main))}** | "
                       f"**{hours(sum(r['gpu_s'] for r in main))}** | |")
        out.append("")
    return "\n".join(out)


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_scale")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sizes", default="5000,20000", help="retrieval + phrases: sentences = images")
    parser.add_argument("--text-sizes", default="10000,200000,1000000,3000000")
    parser.add_argument("--region-rows", default="10000,100000")
    parser.add_argument("--region-boxes", type=int, default=10)
    parser.add_argument("--index-sizes", default="100000")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest N for HNSW (its build is slow)")
    parser.add_argument("--lookup-size", type=int, default=1_000_000)
    parser.add_argument("--detector-images", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="index part at 100k, 1M and 3M vectors")
    parser.add_argument("--fit-embeddings", type=Path, default=None,
                        help="folder of real embedding units for the 'fit' data (default: the pipeline part's)")
    parser.add_argument("--parts", default="text,pipeline,lookup,regions,index")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not (args.data / "text" / "cc3m_validation.tsv").is_file():
        raise SystemExit(f"bench_scale: {args.data} has no text/cc3m_validation.tsv; pass --data")
    parts = set(args.parts.split(","))
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(args.out, args.data)
    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "load_start": load_avg(),
                           "args": {k: str(v) for k, v in vars(args).items() if k != "worker"}}

    def save() -> None:
        res["load_end"] = load_avg()
        res["cc3m"] = extrapolate(res)
        (args.out / "results.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
        (args.out / "results.md").write_text(markdown(res), encoding="utf-8")

    if "text" in parts:
        res["text"] = []
        for n in parse_sizes(args.text_sizes):
            res["text"].append(run("text", f"text-{n}", work=str(work / f"text-{n}"), n=n))
            shutil.rmtree(work / f"text-{n}")
        save()
    real_dirs = [str(args.fit_embeddings)] if args.fit_embeddings else []
    if "pipeline" in parts:
        res["pipeline"] = []
        for n in parse_sizes(args.sizes):
            folder = work / f"pipeline-{n}"
            run("pipeline_prep", f"pipeline-prep-{n}", work=str(folder), n=n)
            ret = run("retrieval", f"retrieval-{n}", work=str(folder))
            phr = run("phrases", f"phrases-{n}", work=str(folder), side_sentences=1200, side_strings=6000)
            res["pipeline"].append({"n": n, "retrieval": ret, "phrases": phr})
            real_dirs = real_dirs if args.fit_embeddings else [str(folder / "retrieval" / "embeddings")]
            save()
    if "lookup" in parts:
        res["lookup"] = run("lookup", "lookup", work=str(work / "lookup"), n=args.lookup_size, calls=20)
        save()
    if "regions" in parts:
        res["regions"] = []
        for n in parse_sizes(args.region_rows):
            folder = work / f"regions-{n}"
            prep = run("regions_prep", f"regions-prep-{n}", work=str(folder), n=n, boxes=args.region_boxes)
            result = run("regions", f"regions-{n}", work=str(folder), boxes=args.region_boxes)
            res["regions"].append({**result, "features_mb": prep["features_mb"], "boxes": args.region_boxes})
            shutil.rmtree(folder)
            save()
        if args.detector_images > 0:
            res["detector"] = run("detector", "detector", work=str(work / "detector"), n=args.detector_images)
            shutil.rmtree(work / "detector")
            save()
    if "index" in parts:
        sizes = [100_000, 1_000_000, 3_000_000] if args.full else parse_sizes(args.index_sizes)
        res["index"] = run_index_part(run, work, sizes, args.hnsw_max, real_dirs)
        save()
    save()
    print(markdown(res))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
