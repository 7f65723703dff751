"""Zero-shot retrieval at benchmark size: the per-pair reference vs the fast scoring path, and two-stage re-scoring.

    python benchmarks/bench_retrieval_eval.py --model MODEL --regions REGIONS --captions CAPTIONS
        [--max-images 0] [--speed-images 20] [--rounds 3] [--ks 5 10 20 50] [--batch-size 32]
        [--precision auto] [--rerank-query salient] [--threads 0] [--out results.json]

On the images of the captions file (every caption of the set is a candidate for every image):
1. Speed, side by side: the reference (``reference_retrieval_scores``: the scoring path before the fast
   one, a full forward per pair with captions padded to the longest) and the fast exhaustive path
   (``retrieval_scores``) in fp32 and bf16, on the first --speed-images images and their captions. The
   three run in turn for --rounds rounds (the order rotates each round), so machine load hits them
   alike; pairs/s is the median round, "x ref" the ratio of medians. Peak memory: resident memory above
   the level before the call (sampled every 2 ms). Identity: fp32 fast vs reference scores (max
   |difference|, recall, share of images whose caption ranking is the same).
2. Exhaustive on the whole set, fp32 and bf16: recall, seconds, pairs/s; the Spearman rank correlation
   of bf16 vs fp32 over all pairs (``precision: auto`` may mean bf16 only if it is >= 0.99).
3. Two-stage: the Sentence-BERT first stage (its seconds and its own recall), then for each k the ITM
   head re-scores the top k captions per image and top k images per caption at --precision: recall,
   pairs scored, seconds.
4. Extrapolation to Flickr30k test (1,000 x 5,000) and COCO 5k test (5,000 x 25,000) from the rates
   measured here, assuming the same caption lengths and regions per image; two-stage assumes no
   overlap between the two directions' pairs (an upper bound). A GPU estimate from the model's FLOPs
   per pair at an ASSUMED sustained rate (--gpu-tflops), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("MUVLA_NO_PROGRESS", "1")

from bench_train import PeakSampler, _exec_with_returning_malloc  # noqa: E402
from muvla.corpus.region_store import RegionStore  # noqa: E402
from muvla.encoders import encode, load_wordpiece_tokenizer  # noqa: E402
from muvla.tasks.batch import DEFAULT_MAX_TEXT_LEN, has_regions_fn  # noqa: E402
from muvla.tasks.image_text_retrieval import (  # noqa: E402
    caption_index,
    exhaustive_scores,
    first_stage_similarity,
    prepare_scoring,
    reference_retrieval_scores,
    retrieval_scores,
    select_retrieval_subset,
    two_stage_scores,
)
from muvla.tasks.metrics import retrieval_recall  # noqa: E402
from muvla.tasks.model import TaskModel, load_encoder, read_task_info, resolve_model_folder, tokenizer_source  # noqa: E402
from muvla.tasks.registry import get_task  # noqa: E402
from muvla.tasks.spec import DEFAULT_RERANK_QUERY, ReadOptions  # noqa: E402
from muvla.utils.device import resolve_precision  # noqa: E402

TARGETS = {"flickr30k_1k_x_5k": (1000, 5000), "coco_5k_x_25k": (5000, 25000)}
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")


def load_model(model: str, feature_dim: int) -> TaskModel:
    """As ``muvla evaluate`` does: a fine-tuned retrieval folder, or any encoder with its ITM head."""
    spec = get_task("retrieval")
    folder = resolve_model_folder(model)
    if folder is not None and read_task_info(folder) is not None:
        return spec.load_model(folder).eval()
    return spec.build_model(load_encoder(model, feature_dim)).eval()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, seconds, peak MB above the starting level)."""
    with PeakSampler(device) as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, mem.peak_mb


def recall(scores: np.ndarray, t2i: list[int], text_scores: np.ndarray | None = None) -> dict[str, float]:
    r = retrieval_recall(scores, t2i, text_scores=text_scores)
    return {k: r[k] for k in RECALL_KEYS}


def fmt_recall(r: dict[str, float]) -> str:
    return " ".join(f"{100 * r[k]:5.1f}" for k in RECALL_KEYS)


def bench_speed(args: argparse.Namespace, model: TaskModel, captions: list, store: RegionStore, tokenizer: Any,
                device: torch.device) -> dict[str, Any]:
    """Reference vs fast fp32 vs fast bf16 on the same pairs, alternating; identity of fp32 vs reference."""
    caps = select_retrieval_subset(captions, args.speed_images)
    image_ids, t2i = caption_index(caps)
    pairs = len(image_ids) * len(caps)
    common = dict(batch_size=args.batch_size, max_text_len=args.max_text_len, device=device)
    variants: dict[str, Callable[[], Any]] = {
        "reference": lambda: reference_retrieval_scores(model, caps, store, tokenizer, **common)[0],
        "fast_fp32": lambda: retrieval_scores(model, caps, store, tokenizer, precision="fp32", **common)[0],
        "fast_bf16": lambda: retrieval_scores(model, caps, store, tokenizer, precision="bf16", **common)[0],
    }
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    peaks: dict[str, float] = {k: 0.0 for k in names}
    scores: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        for name in names[round_ % 3:] + names[:round_ % 3]:
            scores[name], seconds, peak = timed(variants[name], device)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    rate = {k: pairs / statistics.median(v) for k, v in times.items()}
    ref, fast = scores["reference"], scores["fast_fp32"]
    same_rows = float(np.mean((np.argsort(-ref, 1, kind="stable") == np.argsort(-fast, 1, kind="stable")).all(1)))
    return {"images": len(image_ids), "captions": len(caps), "pairs": pairs, "rounds": args.rounds,
            "seconds": times, "pairs_per_s": rate, "peak_mb": peaks,
            "speedup_fp32": rate["fast_fp32"] / rate["reference"], "speedup_bf16": rate["fast_bf16"] / rate["reference"],
            "fp32_max_abs_diff": float(np.abs(fast - ref).max()), "fp32_same_ranking_rows": same_rows,
            "recall_reference": recall(ref, t2i), "recall_fast_fp32": recall(fast, t2i),
            "fp32_recall_identical": recall(ref, t2i) == recall(fast, t2i)}


def bench_full(args: argparse.Namespace, model: TaskModel, captions: list, store: RegionStore, tokenizer: Any,
               device: torch.device) -> dict[str, Any]:
    """Exhaustive fp32 and bf16 on the whole set, then the first stage and two-stage at each k."""
    from scipy.stats import spearmanr

    image_ids, t2i = caption_index(captions)
    n, m = len(image_ids), len(captions)
    out: dict[str, Any] = {"images": n, "captions": m, "pairs": n * m}
    prepared: dict[str, Any] = {}
    exhaustive: dict[str, np.ndarray] = {}
    for precision in ("fp32", "bf16"):
        prepared[precision], prep_s, _ = timed(lambda p=precision: prepare_scoring(
            model, captions, image_ids, store, tokenizer, max_text_len=args.max_text_len, device=device,
            precision=p), device)
        exhaustive[precision], score_s, peak = timed(lambda p=precision: exhaustive_scores(
            model, prepared[p], batch_size=args.batch_size, precision=p), device)
        out[f"exhaustive_{precision}"] = {"prepare_s": prep_s, "score_s": score_s, "seconds": prep_s + score_s,
                                          "pairs_per_s": n * m / score_s, "peak_mb": peak,
                                          "recall": recall(exhaustive[precision], t2i)}
        print(f"  exhaustive {precision}: {prep_s + score_s:7.1f} s ({n * m / score_s:6.0f} pairs/s)  "
              f"R@1/5/10 i2t, t2i, mR: {fmt_recall(out[f'exhaustive_{precision}']['recall'])}", flush=True)
    rho = float(spearmanr(exhaustive["bf16"].ravel(), exhaustive["fp32"].ravel()).statistic)
    out["bf16_vs_fp32"] = {"spearman": rho, "max_abs_diff": float(np.abs(exhaustive["bf16"] - exhaustive["fp32"]).max()),
                           "recall_diff": {k: out["exhaustive_bf16"]["recall"][k] - out["exhaustive_fp32"]["recall"][k]
                                           for k in RECALL_KEYS}}
    print(f"  bf16 vs fp32: Spearman {rho:.5f}, mean recall difference "
          f"{100 * out['bf16_vs_fp32']['recall_diff']['mean_recall']:+.2f} points", flush=True)

    precision = resolve_precision(args.precision, device)
    inputs = prepared[precision]
    keys = prepared[precision].image_keys
    encode(["load the Sentence-BERT encoder before timing"])  # loading is once per process, not per text
    similarity, first_s, _ = timed(lambda: first_stage_similarity(store, keys, captions, args.rerank_query), device)
    out["first_stage"] = {"seconds": first_s, "texts": n + m, "recall": recall(similarity, t2i),
                          "query_mode": args.rerank_query}
    print(f"  first stage ({args.rerank_query} tag query, Sentence-BERT cosine): {first_s:5.1f} s  "
          f"R@1/5/10 i2t, t2i, mR: {fmt_recall(out['first_stage']['recall'])}", flush=True)
    out["two_stage"] = []
    base = out[f"exhaustive_{precision}"]
    for k in args.ks:
        (i2t, t2i_scores, scored), rerank_s, peak = timed(lambda k=k: two_stage_scores(
            model, inputs, similarity, k, batch_size=args.batch_size, precision=precision), device)
        r = recall(i2t, t2i, t2i_scores)
        row = {"k": k, "precision": precision, "pairs_scored": scored, "rerank_s": rerank_s,
               "pairs_per_s": scored / rerank_s, "seconds": base["prepare_s"] + first_s + rerank_s, "peak_mb": peak,
               "recall": r, "recall_minus_exhaustive": {key: r[key] - base["recall"][key] for key in RECALL_KEYS}}
        out["two_stage"].append(row)
        print(f"  two-stage k={k:<3d} {precision}: {row['seconds']:6.1f} s ({scored} pairs)  "
              f"R@1/5/10 i2t, t2i, mR: {fmt_recall(r)}", flush=True)
    return out


def gpu_estimate(model: TaskModel, tokens_per_pair: float, tflops: float) -> dict[str, float]:
    """Pairs/s of an accelerator sustaining ``tflops`` on this model's matrix products (an assumption)."""
    cfg = model.encoder.config
    per_token_layer = 2 * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size)  # FLOPs
    attention = 4 * tokens_per_pair * cfg.hidden_size  # scores and weighted values, per token and layer
    flops = (cfg.num_layers - 1) * tokens_per_pair * (per_token_layer + attention) + \
        per_token_layer + 2 * tokens_per_pair * 2 * cfg.hidden_size ** 2  # last layer: [CLS] + all keys/values
    return {"flops_per_pair": flops, "assumed_tflops": tflops, "pairs_per_s": tflops * 1e12 / flops}


def extrapolate(speed: dict[str, Any], full: dict[str, Any], gpu: dict[str, float]) -> dict[str, Any]:
    """Seconds for the benchmark test sets at the measured rates (same lengths and regions per image)."""
    n, m = full["images"], full["captions"]
    prep_per_image = full["exhaustive_fp32"]["prepare_s"] / n
    encode_per_text = full["first_stage"]["seconds"] / (n + m)
    out: dict[str, Any] = {}
    for name, (images, texts) in TARGETS.items():
        pairs = images * texts
        row: dict[str, Any] = {"pairs": pairs,
                               "reference_s": pairs / speed["pairs_per_s"]["reference"],
                               "exhaustive_fp32_s": images * prep_per_image + pairs / full["exhaustive_fp32"]["pairs_per_s"],
                               "exhaustive_bf16_s": images * prep_per_image + pairs / full["exhaustive_bf16"]["pairs_per_s"],
                               "gpu_exhaustive_s_assumed": pairs / gpu["pairs_per_s"]}
        row["two_stage_s"] = {ts["k"]: images * prep_per_image + (images + texts) * encode_per_text
                              + (images + texts) * ts["k"] / ts["pairs_per_s"] for ts in full["two_stage"]}
        out[name] = row
    return out


def main() -> None:
    _exec_with_returning_malloc()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="muvla model folder (pre-trained or fine-tuned for retrieval)")
    p.add_argument("--regions", type=Path, required=True, help="region store of the captions' images")
    p.add_argument("--captions", type=Path, required=True, help="captions file (as muvla evaluate --captions)")
    p.add_argument("--max-images", type=int, default=0, help="first N images of the captions file (0 = all)")
    p.add_argument("--speed-images", type=int, default=20, help="images (and their captions) of the side-by-side run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (muvla evaluate's default)")
    p.add_argument("--max-text-len", type=int, default=DEFAULT_MAX_TEXT_LEN)
    p.add_argument("--precision", default="auto", help="two-stage re-scoring precision (auto|fp32|bf16)")
    p.add_argument("--rerank-query", default=DEFAULT_RERANK_QUERY)
    p.add_argument("--gpu-tflops", type=float, default=100.0,
                   help="ASSUMED sustained bf16 TFLOP/s of a GPU for the estimate (about a third of an A100's peak)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", type=Path, default=None, help="write the raw results here (JSON)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    store = RegionStore(args.regions)
    model = load_model(args.model, store.feature_dim)
    tokenizer = load_wordpiece_tokenizer(tokenizer_source(args.model))
    captions, _ = get_task("retrieval").load([args.captions], ReadOptions(has_regions=has_regions_fn(store)))
    captions = select_retrieval_subset(captions, args.max_images)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, model {args.model}, batch {args.batch_size}", flush=True)

    speed = bench_speed(args, model, captions, store, tokenizer, device)
    print(f"speed on {speed['images']} images x {speed['captions']} captions ({speed['pairs']} pairs, median of "
          f"{args.rounds} alternating rounds):", flush=True)
    for name in ("reference", "fast_fp32", "fast_bf16"):
        ratio = speed["pairs_per_s"][name] / speed["pairs_per_s"]["reference"]
        print(f"  {name:10s} {speed['pairs_per_s'][name]:7.0f} pairs/s  x{ratio:5.2f} ref  "
              f"peak {speed['peak_mb'][name]:6.0f} MB", flush=True)
    print(f"  fp32 fast vs reference: max |diff| {speed['fp32_max_abs_diff']:.2e}, same caption ranking for "
          f"{100 * speed['fp32_same_ranking_rows']:.1f}% of images, recall identical: {speed['fp32_recall_identical']}",
          flush=True)

    image_ids, _ = caption_index(captions)
    print(f"whole set: {len(image_ids)} images x {len(captions)} captions", flush=True)
    full = bench_full(args, model, captions, store, tokenizer, device)
    prepared = prepare_scoring(model, captions, image_ids, store, tokenizer, max_text_len=args.max_text_len,
                               device=device)
    tokens = float(prepared.text_lengths.mean() + prepared.region_counts.mean())
    gpu = gpu_estimate(model, tokens, args.gpu_tflops)
    targets = extrapolate(speed, full, gpu)
    print(f"extrapolated on this machine ({tokens:.1f} tokens per pair as measured); GPU = ASSUMED "
          f"{args.gpu_tflops:.0f} TFLOP/s sustained ({gpu['flops_per_pair'] / 1e9:.2f} GFLOP per pair), not measured:",
          flush=True)
    for name, row in targets.items():
        two = ", ".join(f"k={k} {seconds / 60:.1f}" for k, seconds in row["two_stage_s"].items())
        print(f"  {name}: reference {row['reference_s'] / 3600:.1f} h, exhaustive fp32 "
              f"{row['exhaustive_fp32_s'] / 3600:.1f} h, bf16 {row['exhaustive_bf16_s'] / 3600:.1f} h; two-stage "
              f"(min) {two}; GPU exhaustive (assumed) {row['gpu_exhaustive_s_assumed'] / 60:.1f} min", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
                                        "speed": speed, "full": full, "gpu_estimate": gpu, "extrapolated": targets,
                                        "tokens_per_pair": tokens}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
