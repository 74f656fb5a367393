"""Training of draft heads: `redrafter train` and `redrafter.training.train(TrainConfig(...))`."""
from redrafter.datasets import heldout_prompts
from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "heldout_prompts", "train"]
