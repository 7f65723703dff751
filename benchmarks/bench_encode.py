"""Sentence-encoding benchmark: PyTorch vs ONNX Runtime, side by side on the COCO caption pool.

    python benchmarks/bench_encode.py [--data ../shared/data] [--limit N] [--chunk 2000] [--queries 1000]
                                      [--variants st-encode,torch,onnx,onnx-1t]

Variants (all all-MiniLM-L6-v2, CPU):
  st-encode  sentence-transformers' own ``encode`` (PyTorch, batches padded to their longest string):
             what the stages ran before, and the reference embeddings
  torch      ``muvla.encoders.encode(backend="torch")``: PyTorch, strings grouped by exact token
             length (batch-independent)
  onnx       ``muvla.encoders.encode(backend="onnx")``: ONNX Runtime fp32 on the cached local export,
             strings grouped by exact token length (batch-independent)
  onnx-1t    the same with one intra-op thread instead of one per core (thread tuning)

Throughput: the pool is cut into chunks and every chunk is encoded by every variant in turn
(A, B, C, A, B, C, ...), so machine load hits all of them alike. sentences/s = strings / seconds
summed over chunks; "x st-encode" = the median over chunks of st-encode's time / the variant's time.
Short phrases (the 2-4-word noun chunks of the pool's captions, batch 256 as in the phrases stage)
are measured the same way.

Quality against the st-encode embeddings of the whole pool: max abs difference, and top-10
neighbour overlap: for --queries captions drawn with a fixed seed, the share of their 10 nearest
pool captions (cosine, self excluded) that a variant's embeddings also rank in the top 10.
Batch dependence: --probe captions are encoded one at a time and compared with their embeddings
from inside their chunk (max abs difference; 0 = independent of the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from muvla import encoders  # noqa: E402

POOL = Path("text") / "coco_val2017_captions_pool.json"
Encoder = Callable[[list[str], int], np.ndarray]


def load_pool(data: Path, limit: int | None) -> list[str]:
    path = data / POOL
    if not path.is_file():
        raise SystemExit(f"bench_encode: {path} not found; pass --data pointing at the shared data folder")
    captions = [a["caption"].strip() for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    return captions[:limit] if limit else captions


def short_phrases(captions: list[str], n_captions: int) -> list[str]:
    """Distinct 2-4-word noun chunks of the first captions: what the phrases stage encodes."""
    nlp = encoders.load_spacy()
    seen: dict[str, None] = {}
    for doc in nlp.pipe(captions[:n_captions], batch_size=256):
        for chunk in doc.noun_chunks:
            if 2 <= len(chunk) <= 4:
                seen.setdefault(chunk.text, None)
    return list(seen)


def variants(wanted: list[str]) -> dict[str, Encoder]:
    st = encoders.load_sentence_encoder()

    def st_encode(texts: list[str], batch_size: int) -> np.ndarray:
        return st.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)

    out: dict[str, Encoder] = {
        "st-encode": st_encode,
        "torch": lambda texts, bs: encoders.encode(texts, batch_size=bs, backend="torch"),
    }
    if encoders.resolve_backend("auto", "cpu") == "onnx":
        onnx = encoders.get_encoder(backend="onnx")
        if onnx.backend == "onnx":
            out["onnx"] = lambda texts, bs: encoders.encode(texts, batch_size=bs, backend="onnx")
            os.environ["OMP_NUM_THREADS"] = "1"  # read once, when the session is made
            one_thread = type(onnx)(onnx.folder)
            del os.environ["OMP_NUM_THREADS"]
            out["onnx-1t"] = one_thread.encode
    else:
        print("onnxruntime is not installed: measuring the PyTorch variants only")
    unknown = sorted(set(wanted) - set(out) - {"onnx", "onnx-1t"})
    if unknown:
        raise SystemExit(f"bench_encode: unknown variants {unknown}; known: st-encode, torch, onnx, onnx-1t")
    return {name: out[name] for name in wanted if name in out}


def interleaved(fns: dict[str, Encoder], texts: list[str], chunk: int, batch_size: int
                ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    """Embeddings, strings/s and median per-chunk speed-up vs the first variant, measured A, B, A, B..."""
    names = list(fns)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for start in range(0, len(texts), chunk):
        piece = texts[start:start + chunk]
        for name in names:
            t0 = time.perf_counter()
            parts[name].append(fns[name](piece, batch_size))
            seconds[name].append(time.perf_counter() - t0)
        print(f"  {min(start + chunk, len(texts))}/{len(texts)}: "
              + ", ".join(f"{n} {len(piece) / seconds[n][-1]:.0f}/s" for n in names), flush=True)
    base = names[0]
    rate = {n: len(texts) / sum(seconds[n]) for n in names}
    ratio = {n: statistics.median(b / s for b, s in zip(seconds[base], seconds[n])) for n in names}
    return {n: np.concatenate(parts[n]) for n in names}, rate, ratio


def top10_overlap(ref: np.ndarray, emb: np.ndarray, queries: np.ndarray) -> float:
    def top10(e: np.ndarray) -> np.ndarray:
        sims = e[queries] @ e.T
        sims[np.arange(len(queries)), queries] = -np.inf
        return np.argpartition(-sims, 10, axis=1)[:, :10]

    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10(ref), top10(emb))]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pool captions")
    parser.add_argument("--chunk", type=int, default=2000, help="strings per interleaved timing chunk")
    parser.add_argument("--batch-size", type=int, default=128, help="sentence batch (the retrieval stage's)")
    parser.add_argument("--phrase-batch-size", type=int, default=256, help="phrase batch (the phrases stage's)")
    parser.add_argument("--phrase-captions", type=int, default=6000, help="captions whose noun chunks are the phrases")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--probe", type=int, default=200)
    parser.add_argument("--variants", default="st-encode,torch,onnx,onnx-1t",
                        help="comma-separated; the first one is the reference (keep st-encode first)")
    args = parser.parse_args()
    os.environ.setdefault("MUVLA_NO_PROGRESS", "1")

    captions = load_pool(args.data, args.limit)
    fns = variants(args.variants.split(","))
    names = list(fns)
    for name in names:  # warm-up: one-time loading and export stay out of the timings
        fns[name](captions[:64], args.batch_size)
    print(f"{len(captions)} captions, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    emb, rate, ratio = interleaved(fns, captions, args.chunk, args.batch_size)

    phrases = short_phrases(captions, args.phrase_captions)
    print(f"{len(phrases)} distinct 2-4-word phrases")
    _, p_rate, p_ratio = interleaved(fns, phrases, args.chunk, args.phrase_batch_size)

    ref = emb[names[0]]
    queries = np.random.default_rng(0).choice(len(captions), min(args.queries, len(captions)), replace=False)
    probe = queries[:args.probe]
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (1 min)\n")
    print("| variant | sentences/s | x st-encode | phrases/s | x st-encode | max abs diff | top-10 overlap "
          "| batch dependence |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        alone = np.stack([fns[name]([captions[i]], args.batch_size)[0] for i in probe])
        dependence = float(np.abs(alone - emb[name][probe]).max())
        print(f"| {name} | {rate[name]:.0f} | {ratio[name]:.2f} | {p_rate[name]:.0f} | {p_ratio[name]:.2f} "
              f"| {np.abs(emb[name] - ref).max():.1e} | {top10_overlap(ref, emb[name], queries):.4f} "
              f"| {dependence:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
