"""Training as library functions (one process); ``jobs/train.py`` wraps them in Ray Train."""

from adcore.training.loop import TrainConfig, TrainHooks, refuse_unused_flags, train

__all__ = ["TrainConfig", "TrainHooks", "refuse_unused_flags", "train"]
