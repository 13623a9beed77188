"""Training as library functions (one process); ``jobs/train.py`` wraps them in Ray Train."""

from adcore.training.loop import TrainConfig, TrainHooks, train

__all__ = ["TrainConfig", "TrainHooks", "train"]
