"""Training-step benchmark: our model vs HuggingFace-BERT references, bf16, the machine's peak, compile.

    python benchmarks/bench_train.py [--sizes minilm bert-base] [--steps 3] [--device cpu|cuda] \
        [--compile-steps 20] [--json runs/bench_train.json]

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

Two references, measured side by side: the naive one above (``reference``), and a fair one
(``reference_masked``) that computes every head only at the labelled positions, as ours does, so
the ratio against it is the encoder's alone. ``ours_bf16`` is our model under bf16 autocast (fp32
weights and losses), timed in the same alternation when the CPU computes bf16 natively (or on CUDA).

How close to the machine's limit: the matmul FLOPs of one step (forward + backward, counted by
``torch.utils.flop_counter``) divided by its median time, against this machine's dense matmul peak
measured in the same run (square ``--peak-size`` matrices, fp32 and bf16).

``--compile-steps N``: the real pre-training step (``PretrainObjectives``: R-T, R-N and I-S with the
curriculum, the bundled MiniLM, a synthetic corpus of the same sizes) eager vs ``torch.compile``
(inductor) of the encoder, on the same N batches: compile time, steady samples/s and the loss of
every step of both (they must agree to float tolerance before compile is worth a setting).

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
from muvla.training.trainer import move_to_device  # noqa: E402

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

    def encode(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text hidden [B, L, H], region hidden [B, R, H], pooled [B, H]) from HuggingFace's encoder."""
        from transformers.masking_utils import create_bidirectional_mask

        e = self.embeddings
        x = torch.cat([e.text(b["input_ids"], None, None, None),
                       e.regions(b["region_features"], b["region_positions"])], 1)
        mask2d = torch.cat([b["attention_mask"], b["region_mask"]], 1).long()
        mask = create_bidirectional_mask(config=self.bert.config, inputs_embeds=x, attention_mask=mask2d)
        h = self.bert.encoder(x, attention_mask=mask).last_hidden_state
        L = b["input_ids"].shape[1]
        return h[:, :L], h[:, L:], self.bert.pooler(h)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        text, regions, pooled = self.encode(b)
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


class ReferenceMasked(Reference):
    """The fair reference: HuggingFace's encoder, every head only at the labelled positions (as ours)."""

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        text, regions, pooled = self.encode(b)
        labels, rm = b["mlm_labels"], b["region_masked"]
        sel = labels != -100
        mlm = F.cross_entropy(self.mlm_head(text[sel]).float(), labels[sel])
        mrc = F.cross_entropy(self.mrc_head(regions[rm]).float(), b["class_ids"][rm])
        mrfr = (self.mrfr_head(regions[rm]).float() - b["original_features"][rm]).pow(2).mean()
        itm = F.binary_cross_entropy_with_logits(self.itm_head(pooled).float(), b["itm_labels"])
        return mlm + mrc + mrfr + itm


class Autocast(nn.Module):
    """A net's forward under bf16 autocast (fp32 weights; the losses are computed in fp32)."""

    def __init__(self, net: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net, self.device_type = net, device.type

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(b).float()


def step_flops(net: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Matmul FLOPs of one forward + backward (torch's flop counter: mm, bmm, addmm, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        net(batch).backward()
    net.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, reps: int = 8) -> float:
    """Dense matmul GFLOP/s of this machine now (median of ``reps`` products of n x n matrices)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


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


def bench_size(name: str, args: argparse.Namespace, device: torch.device, bf16: bool) -> dict:
    torch.manual_seed(0)
    cfg = SIZES[name](region_feature_dim=args.feature_dim, num_region_classes=args.classes)
    model = Model(cfg)
    nets: dict[str, nn.Module] = {"ours": Ours(model).to(device), "reference": Reference(model).to(device),
                                  "reference_masked": ReferenceMasked(model).to(device)}
    if bf16:
        nets["ours_bf16"] = Autocast(Ours(copy.deepcopy(model)).to(device), device)
    batch = {k: v.to(device) for k, v in make_batch(cfg, args.batch, args.text_len, args.regions).items()}
    losses = {}
    for key, net in nets.items():
        net.eval()
        with torch.no_grad():
            losses[key] = float(net(batch))
        net.train()
    flops = {key: step_flops(net, batch) for key, net in nets.items()}
    opts = {key: torch.optim.AdamW(net.parameters(), lr=1e-5) for key, net in nets.items()}
    times: dict[str, list[float]] = {key: [] for key in nets}
    peaks: dict[str, float] = dict.fromkeys(nets, 0.0)
    order = list(nets)
    for i in range(args.warmup + args.steps):
        for key in (order if i % 2 == 0 else order[::-1]):  # alternate the order too
            with PeakSampler(device) as mem:
                t = step(nets[key], opts[key], batch, device)
            peaks[key] = max(peaks[key], mem.peak_mb)
            if i >= args.warmup:
                times[key].append(t)
    median = {k: statistics.median(v) for k, v in times.items()}
    sps = {k: args.batch / t for k, t in median.items()}
    result = {"size": name, "parameters": model.num_parameters(), "losses_eval": losses,
              "samples_per_s": sps, "step_flops": flops,
              "achieved_gflops": {k: flops[k] / median[k] / 1e9 for k in nets},
              "ratio_ours_over_reference": sps["ours"] / sps["reference"],
              "ratio_ours_over_reference_masked": sps["ours"] / sps["reference_masked"],
              "peak_step_mem_mb": peaks, "step_times": times}
    if bf16:
        result["ratio_bf16_over_fp32"] = sps["ours_bf16"] / sps["ours"]
    return result


def bench_compile(args: argparse.Namespace, device: torch.device) -> dict:
    """The real pre-training step, eager vs torch.compile of the encoder, on the same batches."""
    from muvla.corpus.synthetic import write_synthetic_corpus
    from muvla.encoders import load_wordpiece_tokenizer
    from muvla.pretraining.data import PretrainCollator, PretrainCorpus, PretrainDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_corpus(Path(tmp) / "corpus", num_images=args.batch * (args.compile_steps + 2),
                                      feature_dim=args.feature_dim, regions_per_image=args.regions)
        corpus = PretrainCorpus(root, load_wordpiece_tokenizer("default"), max_text_len=args.text_len,
                                max_regions=args.regions)
        ds, collate = PretrainDataset(corpus), PretrainCollator(corpus)
        num_classes = len(corpus.store.classes) or None
        torch.manual_seed(0)
        batches = [collate([ds[(j * args.batch + i) % len(ds)] for i in range(args.batch)])
                   for j in range(args.compile_steps)]
    runs: dict[str, dict] = {}
    for mode in ("eager", "compiled"):
        try:
            runs[mode] = _real_steps(args, device, num_classes, batches, compiled=mode == "compiled")
        # inductor's failures are open-ended (a shape it cannot reason about, a missing compiler); the
        # benchmark reports one instead of stopping
        except Exception as err:  # noqa: BLE001
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            print(f"real step [{mode}]: failed: {type(err).__name__}: {first}", flush=True)
            return {"runs": runs, "compiled_failed": f"{type(err).__name__}: {first}", "steps": args.compile_steps}
    diff = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(runs["eager"]["losses"], runs["compiled"]["losses"])]
    return {"runs": runs, "ratio_compiled_over_eager": runs["compiled"]["samples_per_s"] / runs["eager"]["samples_per_s"],
            "compile_overhead_s": runs["compiled"]["first_step_s"] - runs["eager"]["first_step_s"],
            "max_relative_loss_difference": max(diff), "steps": args.compile_steps}


def _real_steps(args: argparse.Namespace, device: torch.device, num_classes: int | None, batches: list,
                compiled: bool) -> dict:
    """Train ``len(batches)`` real pre-training steps from the same initialisation; losses and times."""
    from muvla.pretraining.objectives import TASKS, PretrainObjectives

    mode = "compiled" if compiled else "eager"
    torch.manual_seed(0)
    # dropout off: eager and compiled code draw different random masks, which would hide whether the
    # arithmetic agrees (with dropout the curves differ by the masks alone)
    model = Model.from_bert("default", region_feature_dim=args.feature_dim, num_region_classes=num_classes,
                            hidden_dropout=0.0, attention_dropout=0.0).to(device)
    objectives = PretrainObjectives(model, TASKS, "muvla", warmup_samples=args.batch * args.compile_steps // 2,
                                    itm_loss_scale=10.0).to(device)
    if compiled:
        model.encoder = torch.compile(model.encoder)
    opt = torch.optim.AdamW(objectives.parameters(), lr=1e-4)
    losses, times = [], []
    for b in batches:
        if device.type == "cuda":
            b = move_to_device(b, device)
        t0 = time.perf_counter()
        out = objectives(b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    steady = statistics.median(times[2:]) if len(times) > 3 else statistics.median(times)
    print(f"real step [{mode}]: first step {times[0]:.1f} s, then {args.batch / steady:.2f} samples/s", flush=True)
    return {"losses": losses, "step_times": times, "first_step_s": times[0], "samples_per_s": args.batch / steady}


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
    p.add_argument("--peak-size", type=int, default=2048, help="side of the matrices of the matmul peak")
    p.add_argument("--compile-steps", type=int, default=0, help="real pre-training steps, eager vs compiled (0 = skip)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from muvla.utils.device import cpu_has_native_bf16

    bf16 = device.type == "cuda" or cpu_has_native_bf16()
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"text {args.text_len} + regions {args.regions}, native bf16 {bf16}, load {os.getloadavg()}", flush=True)
    peak = {"fp32": matmul_peak(device, args.peak_size, torch.float32)}
    if bf16:
        peak["bf16"] = matmul_peak(device, args.peak_size, torch.bfloat16)
    print("dense matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()), flush=True)
    results = {"command": " ".join(sys.argv), "load_average": os.getloadavg(), "matmul_peak_gflops": peak,
               "loader": bench_loader(args), "sizes": []}
    print(f"loader: {results['loader']['loader_samples_per_s']:.1f} samples/s", flush=True)
    for name in args.sizes:
        r = bench_size(name, args, device, bf16)
        results["sizes"].append(r)
        r["loader_over_step"] = results["loader"]["loader_samples_per_s"] / r["samples_per_s"]["ours"]
        r["fraction_of_peak"] = {k: g / peak["bf16" if k.endswith("bf16") else "fp32"]
                                 for k, g in r["achieved_gflops"].items()}
        sps = r["samples_per_s"]
        print(f"{name:9s} params {r['parameters'] / 1e6:6.1f}M  eval loss ours {r['losses_eval']['ours']:.4f} "
              f"ref {r['losses_eval']['reference']:.4f} ref-masked {r['losses_eval']['reference_masked']:.4f}", flush=True)
        for key in sps:
            print(f"  {key:17s} {sps[key]:7.2f} samples/s  {r['achieved_gflops'][key]:6.1f} GFLOP/s "
                  f"({100 * r['fraction_of_peak'][key]:.0f}% of peak)  peak step {r['peak_step_mem_mb'][key]:.0f} MB",
                  flush=True)
        print(f"  ours / reference {r['ratio_ours_over_reference']:.2f} (naive: full-vocabulary MLM everywhere), "
              f"ours / reference_masked {r['ratio_ours_over_reference_masked']:.2f} (fair)"
              + (f", bf16 / fp32 {r['ratio_bf16_over_fp32']:.2f}" if bf16 else "")
              + f", loader/step {r['loader_over_step']:.1f}x", flush=True)
    if args.compile_steps:
        results["compile"] = bench_compile(args, device)
        c = results["compile"]
        print(f"torch.compile on the real step: x{c['ratio_compiled_over_eager']:.2f} samples/s after "
              f"{c['compile_overhead_s']:.0f} s of compiling; loss max relative difference "
              f"{c['max_relative_loss_difference']:.2e}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
