"""A bounded background prefetch of an iterator: the next items are made while the caller works.

The training step (a GPU, or torch's own threads) and the CPU work that makes its batches
(synthesis in NumPy, which releases the GIL for most of its time) then overlap, and the order of
the items is the iterator's own, so results do not change.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()  # end of the source
_POLL_S = 0.1  # how often a blocked producer checks that the consumer still wants items


def prefetched(source: Iterator[T], depth: int) -> Iterator[T]:
    """``source``'s items, made up to ``depth`` ahead in a thread (``depth`` 0: ``source`` itself).

    An exception of ``source`` is raised to the caller at the item where it happened. Closing the
    returned generator early (a ``break``, the time budget) stops the thread after its current item.
    """
    if depth <= 0:
        yield from source
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((_DONE, e))

    thread = threading.Thread(target=produce, name="adcore-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(source, "close", None)
        if close is not None:  # a generator (e.g. holding a Ray Data iterator) released now, not at GC
            close()
