"""The bounded background prefetch: same items in the same order, errors where they happened, early stop."""

from __future__ import annotations

import threading

import pytest

from adcore.training.prefetch import prefetched


def test_items_come_in_order_and_an_error_at_its_place():
    def source():
        yield from range(5)
        raise KeyError("at item 5")

    seen = []
    with pytest.raises(KeyError, match="at item 5"):
        for item in prefetched(source(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_stopping_early_stops_the_thread_and_closes_the_source():
    made, closed = [], threading.Event()

    def source():
        try:
            for i in range(1000):
                made.append(i)
                yield i
        finally:
            closed.set()

    src = source()  # still referenced here: only an explicit close releases it
    it = prefetched(src, depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.is_set(), "the source released when the caller stops"
    assert len(made) <= 3 + 2 + 1, "at most depth items (and the one in hand) made ahead"
    assert not any(t.name == "adcore-prefetch" for t in threading.enumerate())


def test_depth_zero_is_the_source_itself():
    assert list(prefetched(iter(range(4)), depth=0)) == [0, 1, 2, 3]
