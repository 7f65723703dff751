"""muvla: vision-and-language pre-training without paired image-caption data (mu-VLA, CVPR 2022).

Pipeline: images -> regions -> retrieval of unpaired sentences -> region-phrase matching ->
multi-granular pre-training -> downstream fine-tuning.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy ``muvla.Model`` / ``muvla.ModelConfig``: importing torch only when asked keeps ``import muvla`` cheap."""
    if name in ("Model", "ModelConfig"):
        from muvla import model as _model

        return getattr(_model, name)
    raise AttributeError(f"module 'muvla' has no attribute {name!r}")
