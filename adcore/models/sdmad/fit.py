"""SD-MAD's head: signs, weights and selection statistics read off the trained model (no gradients)."""

from __future__ import annotations

from adcore.models.sdmad.head import SDMADHead


def fit_sdmad(model, data) -> SDMADHead:
    """The head scores categories from the exported patch embeddings with the model's own signs,
    weights and stage-2 statistics (set by training; untrained test-size models use their defaults)."""
    del data
    return SDMADHead.from_model(model)
