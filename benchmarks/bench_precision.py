"""bf16 vs fp32 where the user waits: pre-training on a real corpus, and the sentence encoder.

    python benchmarks/bench_precision.py --corpus runs/coco_corpus --config configs/pretrain/muvla.yaml \
        --steps 40 --rounds 2 --sentences 3000 --out runs/bench_precision.json

Pre-training: ``muvla pretrain`` with the shipped config, once per precision per round, in turn
(fp32, bf16, fp32, bf16, ...), each in its own process on the same corpus, seed and steps. It
reports each run's samples/s (median of the logged windows after the first, so start-up is left
out), the bf16/fp32 ratio per round, and how far the bf16 loss curve is from fp32's at every
logged step (the curves of two fp32 runs are identical, so any difference is bf16's rounding).

Sentence encoder: ONNX Runtime fp32 (the CPU default), PyTorch fp32 and PyTorch under bf16
autocast on the same sentences, in turn; sentences/s of each, and the top-10 neighbour overlap of
500 sentences among all of them (bf16 vs fp32), which is what retrieval consumes.

Every figure is written to ``--out`` (JSON) with the command, the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def machine() -> dict:
    from muvla.utils.device import cpu_has_native_bf16

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg(),
            "native_bf16": cpu_has_native_bf16()}


def pretrain_run(args: argparse.Namespace, precision: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "muvla", "pretrain", "--config", str(args.config), "--corpus", str(args.corpus),
           "--out", str(out), "--precision", precision, "--max-steps", str(args.steps), "--log-every",
           str(args.log_every), "--no-tensorboard", "--no-plot", "--save-every", str(10 * args.steps)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, MUVLA_NO_PROGRESS="1"), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    speeds = [r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]]
    return {"precision": precision, "wall_s": round(wall, 1), "samples_per_s": statistics.median(speeds),
            "loss": {r["step"]: r["loss"] for r in rows},
            "parts": {r["step"]: {k: r[k] for k in r if k.startswith("loss_") or k == "itm_acc"} for r in rows}}


def bench_pretrain(args: argparse.Namespace) -> dict:
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for precision in ("fp32", "bf16"):
                run = pretrain_run(args, precision, Path(tmp) / f"{precision}-{rnd}")
                run["round"] = rnd
                runs.append(run)
                print(f"pretrain round {rnd} {precision}: {run['samples_per_s']:.2f} samples/s", flush=True)
    fp32 = [r for r in runs if r["precision"] == "fp32"]
    bf16 = [r for r in runs if r["precision"] == "bf16"]
    ratios = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(fp32, bf16)]
    steps = sorted(fp32[0]["loss"])
    rel = [abs(bf16[0]["loss"][s] - fp32[0]["loss"][s]) / abs(fp32[0]["loss"][s]) for s in steps]
    fp32_repeat = [abs(fp32[-1]["loss"][s] - fp32[0]["loss"][s]) for s in steps]
    return {"runs": runs, "ratio_bf16_over_fp32": ratios, "loss_steps": steps,
            "loss_fp32": [fp32[0]["loss"][s] for s in steps], "loss_bf16": [bf16[0]["loss"][s] for s in steps],
            "max_relative_loss_difference": max(rel), "final_relative_loss_difference": rel[-1],
            "fp32_repeat_max_abs_difference": max(fp32_repeat)}


def top10(emb: np.ndarray, n_queries: int) -> np.ndarray:
    sims = emb[:n_queries] @ emb.T
    return np.argsort(-sims, axis=1, kind="stable")[:, 1:11]


def bench_encoder(args: argparse.Namespace) -> dict:
    import torch

    from muvla import encoders

    lines = []
    with open(args.sentences_file, encoding="utf-8") as f:
        for line in f:
            text = line.split("\t")[0].strip()
            if text:
                lines.append(text)
            if len(lines) >= args.sentences:
                break
    backends = {"onnx_fp32": encoders.get_encoder("default", "cpu", "onnx"),
                "torch_fp32": encoders.get_encoder("default", "cpu", "torch")}
    backends["onnx_fp32"].encode(lines[:64], 64)  # load / export outside the timing
    speeds: dict[str, list[float]] = {"onnx_fp32": [], "torch_fp32": [], "torch_bf16": []}
    emb: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name in speeds:
            encoder = backends["onnx_fp32" if name == "onnx_fp32" else "torch_fp32"]
            t0 = time.perf_counter()
            if name == "torch_bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = encoder.encode(lines, args.encode_batch)
            else:
                out = encoder.encode(lines, args.encode_batch)
            speeds[name].append(len(lines) / (time.perf_counter() - t0))
            emb[name] = out / np.linalg.norm(out, axis=1, keepdims=True)
            print(f"encode {name}: {speeds[name][-1]:.1f} sentences/s", flush=True)
    ref = top10(emb["torch_fp32"], 500)
    overlap = {name: float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, top10(e, 500))]))
               for name, e in emb.items()}
    return {"sentences": len(lines), "sentences_per_s": speeds,
            "median_sentences_per_s": {k: statistics.median(v) for k, v in speeds.items()},
            "top10_overlap_vs_torch_fp32": overlap,
            "max_abs_embedding_difference_bf16": float(np.abs(emb["torch_bf16"] - emb["torch_fp32"]).max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, help="a corpus built by muvla corpus (skip pre-training when absent)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "pretrain" / "muvla.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sentences", type=int, default=3000, help="0 skips the encoder part")
    p.add_argument("--sentences-file", type=Path, default=REPO.parent / "shared" / "data" / "text" / "cc3m_validation.tsv")
    p.add_argument("--encode-batch", type=int, default=128)
    p.add_argument("--out", type=Path, required=True, help="JSON file for every figure")
    args = p.parse_args()
    result = {"command": " ".join(sys.argv), "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.sentences:
        result["encoder"] = bench_encoder(args)
        e = result["encoder"]
        print(f"encoder: onnx fp32 {e['median_sentences_per_s']['onnx_fp32']:.1f}, torch fp32 "
              f"{e['median_sentences_per_s']['torch_fp32']:.1f}, torch bf16 {e['median_sentences_per_s']['torch_bf16']:.1f}"
              f" sentences/s; top-10 overlap bf16 vs fp32 {e['top10_overlap_vs_torch_fp32']['torch_bf16']:.4f}")
    if args.corpus is not None:
        result["pretrain"] = bench_pretrain(args)
        r = result["pretrain"]
        print(f"pretrain: bf16/fp32 samples/s ratio per round {[round(x, 2) for x in r['ratio_bf16_over_fp32']]}; "
              f"loss max relative difference {r['max_relative_loss_difference']:.4f} (final "
              f"{r['final_relative_loss_difference']:.4f}); two fp32 runs differ by {r['fp32_repeat_max_abs_difference']}")
    result["machine_after"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
