"""The Triton backend of :class:`adcore.scorer.Network`: the exported network, served remotely."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from adcore.serving.client import TritonClient

# Requests kept in flight ahead of the head: the server computes chunk k+1 while this
# process matches chunk k against the FAISS index.
DEFAULT_IN_FLIGHT = 1


class TritonNetwork:
    """A Triton model exported from an artifact (``jobs/export.py``), as a scorer's network.

    Args:
        client: A :class:`TritonClient` on the served model.
        max_batch: Largest batch per request (at most the model's ``max_batch_size``).
        in_flight: Requests sent ahead of the one being consumed.
    """

    def __init__(self, client: TritonClient, max_batch: int = 16, in_flight: int = DEFAULT_IN_FLIGHT):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.client = client
        self.max_batch = max_batch
        self.in_flight = in_flight
        # The HTTP client (gevent) works only from the thread that made it: every call goes
        # through this one thread, whichever thread of the caller asks.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton")

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self._thread.submit(self._infer, pixels).result()

    def _infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        from adcore.export import from_triton
        from adcore.scorer import INPUT_NAME

        return from_triton(self.client.infer({INPUT_NAME: np.ascontiguousarray(pixels, dtype=np.float32)}))

    def close(self) -> None:
        """Close the client (from its own thread) and stop the thread."""
        self._thread.submit(self.client.close).result()
        self._thread.shutdown()
