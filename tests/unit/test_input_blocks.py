"""Input blocks are cut by the bytes of the files they list, never lose or repeat a file, and spread a
small night over the cluster's decode CPUs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jobs.scoring.blocks import block_bounds, input_blocks


def _check_cover(bounds, n):
    assert bounds[0] == 0 and bounds[-1] == n and all(a < b for a, b in zip(bounds, bounds[1:]))


def test_blocks_by_bytes_not_by_count(rng):
    small = np.full(100_000, 50_000)  # 100k files of 50 kB: 5 GB
    bounds = block_bounds(small, 256 * 2**20)
    _check_cover(bounds, len(small))
    assert len(bounds) - 1 == -(-small.sum() // (256 * 2**20))  # about 19 blocks, not 1,563 of 64 files
    large = np.full(64, 2**30)  # a few whole-study files: one per block
    assert block_bounds(large, 256 * 2**20) == list(range(65))
    mixed = rng.integers(1, 50 * 2**20, 5_000)
    b = block_bounds(mixed, 256 * 2**20)
    _check_cover(b, len(mixed))
    sums = [mixed[lo:hi].sum() for lo, hi in zip(b, b[1:])]
    assert max(sums[:-1]) < 256 * 2**20 + 50 * 2**20  # a block passes the target by at most one file


def test_small_night_spread_and_cap():
    sizes = np.full(40, 1000)
    b = block_bounds(sizes, 256 * 2**20, min_blocks=8)
    _check_cover(b, 40)
    assert len(b) - 1 >= 8
    capped = block_bounds(sizes, 256 * 2**20, max_files=3)
    _check_cover(capped, 40)
    assert max(hi - lo for lo, hi in zip(capped, capped[1:])) == 3
    assert block_bounds(np.full(3, 10), 100, min_blocks=16) == [0, 1, 2, 3]
    assert block_bounds(np.zeros(0), 100) == [0]


def test_blocks_are_slices_of_the_listing():
    todo = pa.table({"uri": [f"f{i}" for i in range(10)], "size": pa.array([0, 5, 7, 100, 1, 1, 1, 1, 300, 2])})
    blocks = input_blocks(todo, 100, min_blocks=2)
    assert pa.concat_tables(blocks).equals(todo)
