"""``muvla experiment``: the paper's comparisons (METHOD §7) on any images and text, on held-out images."""

from muvla.experiment.config import EvaluationSettings, ExperimentConfig
from muvla.experiment.recipes import RECIPES, ModelRecipe
from muvla.experiment.run import describe, run_experiment

__all__ = ["RECIPES", "EvaluationSettings", "ExperimentConfig", "ModelRecipe", "describe", "run_experiment"]
