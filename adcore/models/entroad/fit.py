"""EntroAD's fit: no references to build (zero-shot), the head passes the network through."""

from __future__ import annotations

from adcore.models.entroad.head import EntroADHead


def fit_entroad(model, data) -> EntroADHead:
    """Nothing is fitted on training data: a target domain's images are never seen."""
    del model, data
    return EntroADHead()
