"""Input blocks of the scoring pipeline: the files to read, cut by the bytes they hold.

A block is the unit of a decode task, and each costs the head an object-store put and a
metadata task: blocks of a fixed number of files are too many on a large night of small files
and too few (too little parallelism) on a night of a few large ones. A block here holds files
adding up to about ``target_bytes`` (by the listing's ``size``), at least one file, and the
night has at least ``min_blocks`` blocks when it has that many files, so every decode CPU of
the cluster gets work.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DEFAULT_TARGET_BYTES = 256 * 2**20  # of input files per block: a few seconds to a minute of decoding
BLOCKS_PER_CPU = 2  # blocks per decode CPU at least: the last ones balance the tail


def block_bounds(sizes: np.ndarray, target_bytes: int, min_blocks: int = 1, max_files: int = 0) -> list[int]:
    """Row offsets where blocks start (and the end), cutting ``sizes`` into runs of about ``target_bytes``.

    The target shrinks so there are at least ``min_blocks`` blocks (when there are that many
    rows); ``max_files`` (> 0) caps the rows of a block.
    """
    n = len(sizes)
    if n == 0:
        return [0]
    sizes = np.maximum(np.asarray(sizes, dtype=np.int64), 1)
    total = int(sizes.sum())
    target = max(1, min(target_bytes, total // max(1, min(min_blocks, n))))
    cum = np.cumsum(sizes)
    # Block i ends after the first row whose running total reaches (i + 1) * target.
    ends = np.searchsorted(cum, np.arange(1, -(-total // target) + 1, dtype=np.int64) * target, side="left") + 1
    bounds = sorted({0, *np.minimum(ends, n).tolist(), n})
    if max_files > 0:
        capped = [0]
        for lo, hi in zip(bounds, bounds[1:]):
            capped += list(range(lo + max_files, hi, max_files)) + [hi]
        bounds = capped
    return bounds


def input_blocks(todo: pa.Table, target_bytes: int, min_blocks: int = 1, max_files: int = 0) -> list[pa.Table]:
    """``todo`` (a listing, column ``size``) as blocks by :func:`block_bounds`."""
    bounds = block_bounds(todo.column("size").to_numpy(zero_copy_only=False), target_bytes, min_blocks, max_files)
    return [todo.slice(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
