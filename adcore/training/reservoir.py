"""A bounded sample of rows that arrive in batches: what a head's fit keeps of its training patches.

A fit sees one batch of embeddings at a time; keeping them all grows with the training set (about
400 KB per image for a ViT-S patch grid). :class:`Reservoir` keeps at most ``cap`` rows: every row, in
arrival order, while they fit (so a fit under the cap is exactly the fit over everything), and a
uniform sample of all the rows seen once they do not (reservoir sampling, Algorithm R, drawn for a
whole batch at once).
"""

from __future__ import annotations

import numpy as np


class Reservoir:
    """At most ``cap`` rows of aligned arrays (same leading length), a uniform sample of all rows added.

    Args:
        cap: Rows kept at most.
        seed: Seed of the replacement draws (an int or a sequence, as ``numpy.random.default_rng``).
    """

    def __init__(self, cap: int, seed=0):
        if cap < 1:
            raise ValueError(f"a reservoir keeps at least one row, cap {cap} given")
        self.cap = int(cap)
        self.seen = 0  # rows added so far
        self._rng = np.random.default_rng(seed)
        self._buf: list[np.ndarray] | None = None  # one buffer per array, grown by doubling up to cap

    def __len__(self) -> int:
        return min(self.seen, self.cap)

    def add(self, *arrays: np.ndarray) -> None:
        """Offer the rows of ``arrays`` (one row per index of the leading axis)."""
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise ValueError("arrays added together need the same number of rows")
        if n == 0:
            if self._buf is None:
                self._buf = [np.empty((0, *a.shape[1:]), a.dtype) for a in arrays]
            return
        kept = len(self)
        fill = min(n, self.cap - kept)  # rows that go to free slots, in order
        if fill:
            self._grow(arrays, kept + fill)
            for buf, a in zip(self._buf, arrays):
                buf[kept : kept + fill] = a[:fill]
        rest = n - fill
        if rest:
            # Row t (0-based over all rows) replaces slot j ~ U{0..t} when j < cap.
            t = self.seen + fill + np.arange(rest)
            slots = (self._rng.random(rest) * (t + 1)).astype(np.int64)
            take = np.flatnonzero(slots < self.cap)
            # A slot drawn twice in one batch keeps the later row, as one-at-a-time sampling would.
            last = len(take) - 1 - np.unique(slots[take][::-1], return_index=True)[1]
            rows, targets = fill + take[last], slots[take[last]]
            for buf, a in zip(self._buf, arrays):
                buf[targets] = a[rows]
        self.seen += n

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The kept rows of each array (views of the reservoir's buffers, no copy)."""
        if self._buf is None:
            raise ValueError("nothing was added to the reservoir")
        return tuple(buf[: len(self)] for buf in self._buf)

    def rows(self) -> np.ndarray:
        """The kept rows of a reservoir of one array."""
        (out,) = self.arrays()
        return out

    def _grow(self, arrays: tuple[np.ndarray, ...], need: int) -> None:
        if self._buf is None:
            self._buf = [np.empty((0, *a.shape[1:]), a.dtype) for a in arrays]
        have = len(self._buf[0])
        if need <= have:
            return
        size = min(self.cap, max(need, 2 * have))
        grown = []
        for buf, a in zip(self._buf, arrays):
            new = np.empty((size, *a.shape[1:]), np.result_type(buf.dtype, a.dtype))
            new[: len(self)] = buf[: len(self)]
            grown.append(new)
        self._buf = grown
