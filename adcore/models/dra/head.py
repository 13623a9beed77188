"""DRA's pipeline head: the network's own score and map (DRA has no FAISS stage to match against)."""

from __future__ import annotations

from adcore.layers.passthrough import PassThroughHead


class DRAHead(PassThroughHead):
    """Passes the network's normalised score and patch map through; nothing to save."""
