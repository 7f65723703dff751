"""Training-step benchmark: our model vs a naive HuggingFace-BERT reference, plus the data loader alone.

    python benchmarks/bench_train.py [--sizes minilm bert-base] [--steps 3] [--device cpu|cuda]

One optimisation step = forward + backward + AdamW step of one pre-training pass over
[CLS] 34 text tokens [SEP] + 50 regions (batch 32): MLM on 15% of the tokens, MRC + MRFR on 15% of
the regions, ITM on [CLS]. Ours = ``muvla.Model`` with heads evaluated only at labelled positions.
Reference = the same embeddings and heads around HuggingFace ``BertModel``'s encoder + pooler fed
with ``inputs_embeds``-style hidden states, heads computed at EVERY position (full-vocabulary MLM
logits for all text tokens, MRC/MRFR for all regions) and ``ignore_index`` losses, as a naive
implementation does. Weights are copied so both compute the same loss (checked in eval mode and
printed). Steps of the two are measured ALTERNATELY in the same process (median samples/s), so
machine load affects both equally. Peak memory: CUDA max allocated, or on CPU the peak resident
memory above the pre-step level, sampled every 2 ms during the step.

Loader: ``PretrainDataset`` + ``PretrainCollator`` (reading a memory-mapped region store, choosing
sentences, all R-T / R-N / I-S masking) on a synthetic corpus of the same sizes, in one process;
acceptance is loader samples/s >= 5x the training step's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from muvla.model import Model, ModelConfig  # noqa: E402
from muvla.model.losses import ITMLoss, MLMLoss, MRCLoss, MRFRLoss  # noqa: E402
from muvla.model.modeling import bert_key_map  # noqa: E402

SIZES = {"minilm": ModelConfig.minilm, "bert-base": ModelConfig.bert_base}


def make_batch(cfg: ModelConfig, batch: int, text_len: int, regions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, cfg.vocab_size, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    labels = torch.where(torch.rand(batch, text_len, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    labels[:, 0] = labels[:, -1] = -100
    feats = torch.randn(batch, regions, cfg.region_feature_dim, generator=g).abs()
    masked = torch.rand(batch, regions, generator=g) < 0.15
    xy = torch.rand(batch, regions, 2, generator=g) * 0.5
    wh = torch.rand(batch, regions, 2, generator=g) * 0.5
    pos = torch.cat([xy, xy + wh, (wh[..., :1] * wh[..., 1:])], -1)
    return {"input_ids": torch.where(labels != -100, torch.full_like(ids, 103), ids),
            "attention_mask": torch.ones(batch, text_len, dtype=torch.bool), "mlm_labels": labels,
            "region_features": feats.masked_fill(masked[..., None], 0.0), "original_features": feats,
            "region_positions": pos, "region_mask": torch.ones(batch, regions, dtype=torch.bool),
            "region_masked": masked, "class_ids": torch.randint(0, cfg.num_region_classes, (batch, regions), generator=g),
            "itm_labels": (torch.rand(batch, generator=g) < 0.5).float()}


class Ours(nn.Module):
    """Our model: heads only at labelled positions."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model
        self.mlm, self.mrc, self.mrfr, self.itm = MLMLoss(), MRCLoss(), MRFRLoss(), ITMLoss()

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        out = m(b["input_ids"], b["attention_mask"], b["region_features"], b["region_positions"], b["region_mask"])
        labels, rm = b["mlm_labels"], b["region_masked"]
        return (self.mlm(m.mlm_head(out.text_hidden, labels != -100), labels)["mlm"]
                + self.mrc(m.mrc_head(out.region_hidden, rm), rm, b["class_ids"])["mrc"]
                + self.mrfr(m.mrfr_head(out.region_hidden, rm), b["original_features"], rm)["mrfr"]
                + self.itm(m.itm_head(out.pooled), b["itm_labels"])["itm"])


class Reference(nn.Module):
    """HuggingFace BertModel encoder + pooler with the same embeddings and heads, heads at every position."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        c = model.config
        hf_cfg = BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                            num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                            hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout,
                            max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps)
        self.bert = BertModel(hf_cfg)
        ours = model.state_dict()
        hf_state = self.bert.state_dict()
        with torch.no_grad():
            for hf_key, our_key in bert_key_map(c.num_layers).items():
                if hf_key in hf_state:
                    hf_state[hf_key].copy_(ours[our_key])
        copied = copy.deepcopy(model)  # same embeddings / heads (tied MLM decoder stays tied in the copy)
        self.embeddings = copied.encoder.embeddings
        self.mlm_head, self.mrc_head, self.mrfr_head, self.itm_head = (copied.mlm_head, copied.mrc_head,
                                                                       copied.mrfr_head, copied.itm_head)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        e = self.embeddings
        x = torch.cat([e.text(b["input_ids"], None, None, None),
                       e.regions(b["region_features"], b["region_positions"])], 1)
        mask2d = torch.cat([b["attention_mask"], b["region_mask"]], 1).long()
        mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=x, attention_mask=mask2d)
        h = self.bert.encoder(x, attention_mask=mask).last_hidden_state
        pooled = self.bert.pooler(h)
        L = b["input_ids"].shape[1]
        text, regions = h[:, :L], h[:, L:]
        logits = self.mlm_head(text)  # [B, L, V]: every position, as a naive implementation does
        mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["mlm_labels"].reshape(-1), ignore_index=-100)
        rm = b["region_masked"]
        cls_logits = self.mrc_head(regions)  # [B, R, C]
        targets = torch.where(rm, b["class_ids"], torch.full_like(b["class_ids"], -100))
        mrc = F.cross_entropy(cls_logits.reshape(-1, cls_logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        err = (self.mrfr_head(regions).float() - b["original_features"]).pow(2).mean(-1)  # [B, R]
        mrfr = (err * rm).sum() / rm.sum().clamp(min=1)
        itm = F.binary_cross_entropy_with_logits(self.itm_head(pooled).float(), b["itm_labels"])
        return mlm + mrc + mrfr + itm


class PeakSampler:
    """Peak memory of a code block: CUDA max allocated, or sampled RSS above the starting level on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def __enter__(self) -> PeakSampler:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start = self._rss_mb()
        self.top = self.start
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.is_set():
                self.top = max(self.top, self._rss_mb())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
            return
        self.stop.set()
        self.thread.join()
        self.peak_mb = max(self.top, self._rss_mb()) - self.start


def step(net: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """One optimisation step; returns its wall time in seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = net(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_size(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = SIZES[name](region_feature_dim=args.feature_dim, num_region_classes=args.classes)
    model = Model(cfg)
    ours, ref = Ours(model).to(device), Reference(model).to(device)
    batch = {k: v.to(device) for k, v in make_batch(cfg, args.batch, args.text_len, args.regions).items()}
    ours.eval(), ref.eval()
    with torch.no_grad():
        loss_ours, loss_ref = float(ours(batch)), float(ref(batch))
    ours.train(), ref.train()
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-5), "reference": torch.optim.AdamW(ref.parameters(), lr=1e-5)}
    nets = {"ours": ours, "reference": ref}
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    peaks: dict[str, float] = {"ours": 0.0, "reference": 0.0}
    for i in range(args.warmup + args.steps):
        for key in (("ours", "reference") if i % 2 == 0 else ("reference", "ours")):  # alternate the order too
            with PeakSampler(device) as mem:
                t = step(nets[key], opts[key], batch, device)
            peaks[key] = max(peaks[key], mem.peak_mb)
            if i >= args.warmup:
                times[key].append(t)
    sps = {k: args.batch / statistics.median(v) for k, v in times.items()}
    return {"size": name, "parameters": model.num_parameters(), "loss_ours": loss_ours, "loss_reference": loss_ref,
            "samples_per_s_ours": sps["ours"], "samples_per_s_reference": sps["reference"],
            "ratio_ours_over_reference": sps["ours"] / sps["reference"],
            "peak_step_mem_mb_ours": peaks["ours"], "peak_step_mem_mb_reference": peaks["reference"],
            "step_times_ours": times["ours"], "step_times_reference": times["reference"]}


def bench_loader(args: argparse.Namespace) -> dict:
    from muvla.corpus.synthetic import write_synthetic_corpus
    from muvla.encoders import load_wordpiece_tokenizer
    from muvla.pretraining.data import PretrainCollator, PretrainCorpus, PretrainDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_corpus(Path(tmp) / "corpus", num_images=max(args.batch * 4, 64),
                                      feature_dim=args.feature_dim, regions_per_image=args.regions)
        corpus = PretrainCorpus(root, load_wordpiece_tokenizer("default"), max_text_len=args.text_len,
                                max_regions=args.regions)
        ds, collate = PretrainDataset(corpus), PretrainCollator(corpus)
        n = len(ds)
        collate([ds[i] for i in range(args.batch)])  # warm caches
        t0 = time.perf_counter()
        for j in range(args.loader_batches):
            collate([ds[(j * args.batch + i) % n] for i in range(args.batch)])
        elapsed = time.perf_counter() - t0
    return {"loader_samples_per_s": args.loader_batches * args.batch / elapsed, "loader_batches": args.loader_batches}


def _exec_with_returning_malloc() -> None:
    """Re-run this script with glibc returning large freed blocks to the OS at once.

    Otherwise memory freed by one model's step stays in the heap and the other model's step reuses it
    without raising the resident size, which would make the CPU peak-memory comparison meaningless.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _exec_with_returning_malloc()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["minilm", "bert-base"], choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--text-len", type=int, default=36)
    p.add_argument("--regions", type=int, default=50)
    p.add_argument("--feature-dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured steps per model (alternating)")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"text {args.text_len} + regions {args.regions}", flush=True)
    results = {"loader": bench_loader(args), "sizes": []}
    print(f"loader: {results['loader']['loader_samples_per_s']:.1f} samples/s", flush=True)
    for name in args.sizes:
        r = bench_size(name, args, device)
        results["sizes"].append(r)
        loader_x = results["loader"]["loader_samples_per_s"] / r["samples_per_s_ours"]
        r["loader_over_step"] = loader_x
        print(f"{name:9s} params {r['parameters'] / 1e6:6.1f}M  loss ours {r['loss_ours']:.4f} ref {r['loss_reference']:.4f}  "
              f"samples/s ours {r['samples_per_s_ours']:7.2f} ref {r['samples_per_s_reference']:7.2f}  "
              f"ratio ours/ref {r['ratio_ours_over_reference']:.2f}  peak step MB ours {r['peak_step_mem_mb_ours']:.0f} "
              f"ref {r['peak_step_mem_mb_reference']:.0f}  loader/step {loader_x:.1f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
