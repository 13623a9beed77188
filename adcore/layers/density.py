"""PatchCore's image-score reweighting by memory-bank density (Roth et al. 2022, eq. 7)."""

from __future__ import annotations

import numpy as np

from adcore.index import PatchIndex


def density_weights(
    index: PatchIndex, bank: np.ndarray, patches: np.ndarray, nearest: np.ndarray, k: int
) -> np.ndarray:
    """``1 - softmax`` weight [B] of each patch's nearest bank row among that row's neighbours.

    ``patches`` [B, E] are the most anomalous patch of each image (``m``), ``nearest`` [B] the row
    numbers of their nearest bank rows (``m*``) in ``bank`` [M, E], indexed by ``index`` (L2). With
    ``N_b(m*)`` the ``k`` bank rows nearest ``m*`` (``m*`` itself first), the weight is
    ``1 - exp||m - m*|| / sum_{n in N_b(m*)} exp||m - n||``: near 1 when ``m*`` is a rare normal
    pattern far from the rest of the bank, towards ``1 - 1/k`` in a dense region.
    """
    k = min(k, len(bank))
    _, support = index.search(bank[nearest], k=k)  # [B, k], the row itself first
    support[:, 0] = nearest  # ties: the row itself is the reference of the softmax
    d = np.linalg.norm(bank[support] - patches[:, None, :].astype(np.float32), axis=-1)  # [B, k]
    z = d - d.max(1, keepdims=True)  # softmax of the distances themselves, as in eq. 7
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return 1.0 - soft[:, 0]
