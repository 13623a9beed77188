"""What a method family hands the pipeline: one record per folder under ``adcore/models/``.

A family folder (``adcore/models/<family>/``) exports ``FAMILY``, a :class:`MethodFamily`.
Generic code (registry, training loop, scorer, export, jobs) only talks to these
records and never branches on a family's name:

* ``config_class`` / ``model_class``: the network, rebuilt from an artifact's config;
* ``head_class``: the FAISS-stage head (network outputs -> raw score and map), with
  ``config()``/``arrays()`` to save it and ``from_saved(config, arrays, use_gpu)`` to rebuild it;
* ``fit(model, data)``: builds the head from training data (memory bank, centroids,
  references): a function call without gradients;
* ``train(model, ctx)``: the family's gradient stages, or None when it has none;
* ``presets``: the folder of its named presets (JSON);
* ``needs_labelled_anomalies``: the training loop refuses to train it without labelled anomalies.
* ``needs_images_in_memory``: its stages index the rank's decoded images (``batches.pixels``), so
  ``jobs/train.py`` loads the shard into memory instead of streaming it.
* ``signs``: reads a sign-bank file (``--signs FILE``) into model config overrides; None: the family
  has no sign bank and the flag is refused.
* ``domain_field``: where its config names the imaging domain of its text prompts (e.g. ``("text",
  "domain")``); training sets it from ``--domain`` or the dataset's ``dataset.json``. Empty: no prompts.
* ``autocast``: the dtype its scoring network may run under on CUDA (measured within 0.005 AUROC), or None.
* ``train_flags``: which of the run's schedule flags (:data:`SCHEDULE_FLAGS`) its training reads; the
  entry points refuse the others when they are given, with ``own_schedule`` saying where the family's
  own schedule is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The run's schedule flags (``adcore.training.TrainConfig`` fields) that a family may or may not read.
SCHEDULE_FLAGS = ("epochs", "minutes", "lr", "batch_size", "domain_epochs", "domain_lr", "warmup_share")


class Head(Protocol):
    """The FAISS stage of a method: network outputs -> (raw image scores [B], raw maps [B, g, g])."""

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...

    def config(self) -> dict: ...

    def arrays(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class MethodFamily:
    name: str
    config_class: type
    model_class: type
    head_class: type
    fit: Callable[[Any, Any], Head]
    presets: Path
    train: Callable[[Any, Any], dict] | None = None  # None: no gradient stages (e.g. PatchCore)
    needs_labelled_anomalies: bool = False  # trains on labelled anomalies (train/Ungood, --labelled N), e.g. DRA
    needs_images_in_memory: bool = False  # indexes the shard's images (DRA's balanced batches): no streamed input
    train_flags: tuple[str, ...] = ()  # the SCHEDULE_FLAGS its training reads; the others are refused when given
    own_schedule: str = ""  # where its own schedule is set instead (the refusal's hint)
    signs: Callable[[str], dict] | None = None  # --signs FILE -> model config overrides; None: no sign bank
    domain_field: tuple[str, ...] = ()  # config path of the prompts' imaging domain; () when it has no prompts
    # torch dtype name the scoring network may run under on CUDA (torch.autocast), set once the family's
    # scores under it were measured within 0.005 image AUROC of fp32 (bench/gpu_check.sh); None: fp32
    autocast: str | None = None
    description: str = ""
