"""What every adcore model returns, and the small contract the pipeline relies on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelOutput:
    """One forward pass. Every model fills every field, in training and at inference.

    ``anomaly_map`` and ``map_logit`` are on the model's patch grid; the scoring
    pipeline interpolates them to each image's own size.
    """

    # [B] base image score: a probability, or the raw logit where the family's head passes it through
    # (DRA, SD-MAD: float32 sigmoids would tie at 1.0); the calibration maps it to [0, 1] either way.
    score: torch.Tensor
    anomaly_map: torch.Tensor  # [B, g, g] base per-patch anomaly score (probability or logit, as ``score``)
    patch_embeddings: torch.Tensor  # [B, g*g, E] what the FAISS stage matches
    image_logit: torch.Tensor  # [B]
    map_logit: torch.Tensor  # [B, g, g]


class AnomalyModel(nn.Module):
    """Base class: a network taking [B, 3, S, S] images in [0, 1] (S = ``input_size``).

    Each tower normalises and resizes inside ``forward``, so the exported graph
    and a Triton server take plain [0, 1] pixels.
    """

    input_size: int
    grid: int
    embedding_dim: int

    def config_dict(self) -> dict:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
