"""The shared training engine: pre-training and fine-tuning both sit on top of it.

``Trainer`` runs any model whose ``forward(batch)`` returns a :class:`StepOutput`: AdamW with
warm-up/decay, accumulation, clipping, mixed precision, DDP under torchrun, atomic checkpoints and
exact resume. Neither ``muvla.pretraining`` nor ``muvla.tasks`` is imported from here.
"""

from muvla.training.distributed import DistInfo, init_distributed
from muvla.training.trainer import (
           SCHEDULE_SETTINGS,
           StepOutput,
           TrainConfig,
           Trainer,
           TrainerSettings,
           move_to_device,
)

__all__ = ["SCHEDULE_SETTINGS", "DistInfo", "StepOutput", "TrainConfig", "Trainer", "TrainerSettings",
           "init_distributed",
           "move_to_device"]
