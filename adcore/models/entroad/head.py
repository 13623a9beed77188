"""EntroAD's pipeline head: the network's own score and map.

Zero-shot on an unseen domain means nothing of the target domain is matched against, so there is
no memory bank or centroid to search: the head passes the network's outputs through.
"""

from __future__ import annotations

from adcore.layers.passthrough import PassThroughHead


class EntroADHead(PassThroughHead):
    """Passes the network's score and patch map through; nothing to save."""
