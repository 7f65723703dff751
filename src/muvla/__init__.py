"""muvla: vision-and-language pre-training without paired image-caption data (mu-VLA, CVPR 2022).

Pipeline: images -> regions -> retrieval of unpaired sentences -> region-phrase matching ->
multi-granular pre-training -> downstream fine-tuning.
"""

__version__ = "0.1.0"
