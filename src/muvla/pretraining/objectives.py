"""The three-granularity pre-training objectives and the curriculum (METHOD §5-7).

``PretrainObjectives`` wraps a :class:`muvla.model.Model` and turns a masked
:class:`~muvla.pretraining.data.PretrainBatch` into a ``StepOutput`` for the generic trainer:

- R-T pass, [tags ; regions]: MLM on tags + MRC + MRFR (to the ORIGINAL features) on masked regions;
  each tag piece carries its region's box.
- R-N pass, [t^r ; regions] with one modality masked: MLM on phrase tokens, or p-MRTC on matched regions.
- I-S pass, [t^r or random sentence ; regions]: ITM (BCE, 50/50) + MLM on positives.

Every loss term is a scalar mean over its labelled items (``muvla.model.losses``); the total is their
plain sum (METHOD §6), so a step's loss is a scalar mean over the micro-batch. ``itm_loss_scale``
(1 in METHOD) multiplies the ITM term: an init without an MLM head (the bundled MiniLM) starts three
fresh MLM heads at ~ln|V| = 10 nats each, which take nearly all of the encoder's gradient in a short
run while the ITM term sits at ln 2; a larger scale lets ITM learn within a CPU budget.

Curriculum (METHOD §6): during the warm-up, the first ``warmup_samples`` training samples (counted
over all ranks), the loss is L_RT + L_RN + L_IS; afterwards L_RT + w_ITM * (L_RN + L_IS), where w_ITM
[B] is the detached ITM probability that the sample's own pair (v, t^r) matches. The warm-up is
counted in samples, not epochs, because it exists to let the ITM head become competent, which takes
a number of samples whatever the corpus size: the paper's m = 1 epoch is ~3M samples, whereas one
epoch of a small corpus is a few steps, after which every R-N and I-S term would be multiplied by an
untrained head's ~0.5. The count is a buffer, so it is checkpointed and a resumed run continues it.

WHERE w_ITM COMES FROM: the ITM head applied to the pooled output of the R-N pass, which is exactly
the sample's (v, t^r) pair (with its ~15% phrase-token or region masking), so no extra forward pass
is needed; the I-S pass cannot give it because half of its pairs are negatives. Without the R-N task
an extra no-grad pass on the unmasked pair provides it. With ``itm_weight="per_sample"`` each
sample's R-N and I-S items are weighted by its own w_ITM (the loss modules' ``sample_weight``);
``"batch_mean"`` multiplies (L_RN + L_IS) by the batch mean, which is what the reference code
effectively did. Without the I-S task the ITM head is never trained, so the curriculum is off
(plain sum) and this is logged as ``curriculum = 0``.

Round robin (U-VisualBERT baseline, METHOD §7): even forward calls are text-only batches (MLM on the
sentences, no regions), odd calls are image-only batches ([tags ; regions], MLM on tags + MRC + MRFR).
The call counter is a buffer, so it is checkpointed with the weights and a resumed run keeps parity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from muvla.model import ITMLoss, MLMLoss, Model, MRCLoss, MRFRLoss, PMRTCLoss
from muvla.pretraining.data import PretrainBatch
from muvla.training import StepOutput

TASKS = ("rt", "rn", "is")
TRAINING_MODES = ("muvla", "round_robin")
ITM_WEIGHTS = ("per_sample", "batch_mean")


class PretrainObjectives(nn.Module):
    """Model + losses; ``forward(batch) -> StepOutput`` with every named loss in ``logs``."""

    def __init__(self, model: Model, tasks: Sequence[str] = TASKS, mode: str = "muvla", warmup_samples: int = 0,
                 itm_weight: str = "per_sample", itm_loss_scale: float = 1.0) -> None:
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
        if mode not in TRAINING_MODES:
            raise ValueError(f"mode must be one of {TRAINING_MODES}, got {mode!r}")
        if itm_weight not in ITM_WEIGHTS:
            raise ValueError(f"itm_weight must be one of {ITM_WEIGHTS}, got {itm_weight!r}")
        if warmup_samples < 0:
            raise ValueError(f"warmup_samples must be >= 0, got {warmup_samples}")
        if not itm_loss_scale > 0:
            raise ValueError(f"itm_loss_scale must be > 0, got {itm_loss_scale}")
        self.model = model
        self.tasks = tuple(t for t in TASKS if t in tasks)
        self.mode = mode
        self.warmup_samples = warmup_samples
        self.itm_weight = itm_weight
        self.itm_loss_scale = itm_loss_scale
        self.mlm = MLMLoss()
        self.mrc = MRCLoss()
        self.mrfr = MRFRLoss()
        self.pmrtc = PMRTCLoss()
        self.itm = ITMLoss()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # round-robin parity, checkpointed
        # training samples seen so far over all ranks (the curriculum's clock), checkpointed
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))

    @property
    def curriculum_active(self) -> bool:
        """True once the warm-up is over (and the ITM head is trained at all)."""
        return self.mode == "muvla" and "is" in self.tasks and int(self.samples_seen) >= self.warmup_samples

    def _count_samples(self, batch_size: int) -> None:
        """Advance the curriculum clock by this step's samples on every rank (ranks get equal batches)."""
        if self.training:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            self.samples_seen += batch_size * world

    # ---- passes -------------------------------------------------------------------------------

    def _rt(self, b: PretrainBatch, logs: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        out = m(b.rt_input_ids, b.rt_attention_mask, b.rt_region_features, b.region_positions, b.region_mask,
                text_box_positions=b.rt_box_positions, text_box_mask=b.rt_box_mask)
        labels, masked = b.rt_mlm_labels, b.rt_region_masked
        mlm = self.mlm(m.mlm_head(out.text_hidden, labels != -100), labels)["mlm"]
        mrc = self.mrc(m.mrc_head(out.region_hidden, masked), masked, b.region_class_ids, b.region_class_probs)["mrc"]
        mrfr = self.mrfr(m.mrfr_head(out.region_hidden, masked), b.region_features, masked)["mrfr"]
        logs.update(loss_rt_mlm=mlm.detach(), loss_rt_mrc=mrc.detach(), loss_rt_mrfr=mrfr.detach())
        loss = mlm + mrc + mrfr
        logs["loss_rt"] = loss.detach()
        return loss

    def _rn(self, b: PretrainBatch, weighted: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """R-N losses and w_ITM [B] from the same pass (detached); ``weighted``: apply w_ITM per sample."""
        m = self.model
        out = m(b.rn_input_ids, b.text_attention_mask, b.rn_region_features, b.region_positions, b.region_mask)
        w = torch.sigmoid(m.itm_head(out.pooled.detach()).float()).detach()
        sw = w if weighted else None
        labels, masked = b.rn_mlm_labels, b.rn_region_masked
        mlm = self.mlm(m.mlm_head(out.text_hidden, labels != -100), labels, sample_weight=sw)["mlm"]
        pmrtc = self.pmrtc(m.mlm_head(out.region_hidden, masked), masked, b.rn_pmrtc_targets,
                           sample_weight=sw)["pmrtc"]
        loss = mlm + pmrtc
        return loss, {"loss_rn_mlm": mlm.detach(), "loss_rn_pmrtc": pmrtc.detach(), "loss_rn": loss.detach()}, w

    def _is(self, b: PretrainBatch, weight: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.model
        out = m(b.is_input_ids, b.is_attention_mask, b.region_features, b.region_positions, b.region_mask)
        logits = m.itm_head(out.pooled)
        itm = self.itm(logits, b.itm_labels, sample_weight=weight)["itm"]  # logged unscaled: ln 2 is chance
        labels = b.is_mlm_labels
        mlm = self.mlm(m.mlm_head(out.text_hidden, labels != -100), labels, sample_weight=weight)["mlm"]
        loss = self.itm_loss_scale * itm + mlm
        acc = ((logits.detach() > 0).float() == b.itm_labels).float().mean()
        return loss, {"loss_is_itm": itm.detach(), "loss_is_mlm": mlm.detach(), "loss_is": loss.detach(),
                      "itm_acc": acc}

    @torch.no_grad()
    def match_probability(self, b: PretrainBatch) -> torch.Tensor:
        """P(match) of each sample's unmasked (v, t^r) pair, [B] (used when R-N is not trained, and for eval)."""
        m = self.model
        out = m(b.text_input_ids, b.text_attention_mask, b.region_features, b.region_positions, b.region_mask)
        return torch.sigmoid(m.itm_head(out.pooled).float())

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, b: PretrainBatch) -> StepOutput:
        if self.mode == "round_robin":
            return self._round_robin(b)
        logs: dict[str, torch.Tensor] = {}
        zero = b.region_features.new_zeros(())
        loss_rt = self._rt(b, logs) if "rt" in self.tasks else zero
        curriculum = self.curriculum_active  # decided on the samples seen BEFORE this batch
        self._count_samples(len(b))
        per_sample = curriculum and self.itm_weight == "per_sample"

        # R-N first: its pooled output gives w_ITM of the sample's own (v, t^r) pair
        w: torch.Tensor | None = None
        loss_rn = zero
        if "rn" in self.tasks:
            loss_rn, rn_logs, w = self._rn(b, weighted=per_sample)
            logs.update(rn_logs)
        elif "is" in self.tasks:
            w = self.match_probability(b)
        loss_is = zero
        if "is" in self.tasks:
            loss_is, is_logs = self._is(b, w if per_sample else None)
            logs.update(is_logs)

        if not curriculum:
            loss = loss_rt + loss_rn + loss_is
        elif per_sample:
            loss = loss_rt + loss_rn + loss_is  # the R-N and I-S terms are already weighted per sample
        else:
            loss = loss_rt + w.mean() * (loss_rn + loss_is)
        if w is not None:
            logs["w_itm_mean"] = w.mean()
        logs["curriculum"] = torch.tensor(float(curriculum))
        return StepOutput(loss=loss, logs=logs)

    def _round_robin(self, b: PretrainBatch) -> StepOutput:
        """Even calls: text-only MLM on the sentences; odd calls: image-only [tags ; regions]."""
        text_turn = int(self.calls) % 2 == 0
        if self.training:
            self.calls += 1
        logs: dict[str, torch.Tensor] = {}
        if text_turn:
            m = self.model
            out = m(b.is_input_ids, b.is_attention_mask)
            labels = b.is_mlm_labels
            loss = self.mlm(m.mlm_head(out.text_hidden, labels != -100), labels)["mlm"]
            logs["loss_text_mlm"] = loss.detach()
        else:
            loss = self._rt(b, logs)
        return StepOutput(loss=loss, logs=logs)
