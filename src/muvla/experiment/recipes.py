"""The compared models of an experiment (METHOD §7), as an explicit name -> recipe mapping.

A recipe says which (image, sentence) pairing the model pre-trains on and how: the retrieved pairs
(μ-VLA), random pairs (joint unaligned), the ground-truth captions (aligned, the supervised upper
bound) or a mix (aligned ratio p), with the pre-training mode, the granularities and K.
"""

from __future__ import annotations

from dataclasses import dataclass

from muvla.pretraining.objectives import TASKS

PAIRINGS = ("none", "retrieval", "random", "aligned", "aligned_ratio")


@dataclass(frozen=True)
class ModelRecipe:
    """How one compared model is pre-trained."""

    name: str
    pairing: str  # one of PAIRINGS ("none": no pre-training)
    mode: str  # muvla | round_robin | base
    tasks: tuple[str, ...] = TASKS
    k: int | None = None  # use only the first k retrieved sentences (the K ablation)
    p: float | None = None  # aligned_ratio: fraction of images paired with their own captions
    label: str = ""  # the paper's name for it

    @property
    def corpus(self) -> str:
        """Name of the corpus this model trains on (models with the same pairing share one)."""
        return self.pairing if self.p is None else f"{self.pairing}_{self.p:g}"


RECIPES: dict[str, ModelRecipe] = {
    "base": ModelRecipe("base", "none", "base", label="BERT init, no V+L pre-training"),
    "round_robin": ModelRecipe("round_robin", "retrieval", "round_robin", label="U-VisualBERT"),
    "joint_unaligned": ModelRecipe("joint_unaligned", "random", "muvla", label="random pairs"),
    "muvla": ModelRecipe("muvla", "retrieval", "muvla", label="μ-VLA: retrieved pairs"),
    "aligned": ModelRecipe("aligned", "aligned", "muvla", label="ground-truth captions"),
    "aligned_ratio_0.5": ModelRecipe("aligned_ratio_0.5", "aligned_ratio", "muvla", p=0.5,
                                     label="half the images with their captions"),
    "muvla_rt": ModelRecipe("muvla_rt", "retrieval", "muvla", tasks=("rt",), label="R-T only"),
    "muvla_rt_rn": ModelRecipe("muvla_rt_rn", "retrieval", "muvla", tasks=("rt", "rn"), label="R-T + R-N"),
    "muvla_rt_is": ModelRecipe("muvla_rt_is", "retrieval", "muvla", tasks=("rt", "is"), label="R-T + I-S"),
    "muvla_k1": ModelRecipe("muvla_k1", "retrieval", "muvla", k=1, label="K = 1"),
}
