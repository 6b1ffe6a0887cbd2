"""Training: recipes, built-in data, and the transformers Trainer glue behind ``hypermerge train``."""

from hypermerge.training.recipe import Recipe, load_recipe
from hypermerge.training.trainer import TrainResult, train

__all__ = ["Recipe", "TrainResult", "load_recipe", "train"]
