"""The μ-VLA single-stream model: encoder, pre-training heads and losses (METHOD §4-5)."""

from muvla.model.heads import ITMHead, MLMHead, MRCHead, MRFRHead, gather_positions
from muvla.model.losses import ITMLoss, MLMLoss, MRCLoss, MRFRLoss, PMRTCLoss
from muvla.model.modeling import (
    Encoder,
    EncoderOutput,
    LoadingInfo,
    Model,
    ModelConfig,
    default_bert_folder,
    resolve_bert_folder,
)

__all__ = [
    "Encoder",
    "EncoderOutput",
    "ITMHead",
    "ITMLoss",
    "LoadingInfo",
    "MLMHead",
    "MLMLoss",
    "MRCHead",
    "MRCLoss",
    "MRFRHead",
    "MRFRLoss",
    "Model",
    "ModelConfig",
    "PMRTCLoss",
    "default_bert_folder",
    "gather_positions",
    "resolve_bert_folder",
]
