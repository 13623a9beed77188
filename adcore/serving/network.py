"""The Triton backend of :class:`adcore.scorer.Network`: the exported network, served remotely."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from adcore.serving.client import TritonClient

# Outputs with no dimension but the batch one; Triton rejects empty dims, so they are served as dims [1] + reshape [].
BATCH_ONLY_OUTPUTS = ("score",)
# Requests kept in flight ahead of the head: the server computes chunk k+1 while this
# process matches chunk k against the FAISS index.
DEFAULT_IN_FLIGHT = 1


def from_triton(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Triton's outputs -> ``Scorer.forward``'s shapes (``score`` is served as dims [1], so it comes back [B, 1])."""
    out = dict(outputs)
    for name in BATCH_ONLY_OUTPUTS:
        if name in out:
            out[name] = np.asarray(out[name]).reshape(-1)
    return out


class TritonNetwork:
    """A Triton model exported from an artifact (``jobs/export.py``), as a scorer's network.

    Over gRPC, ``in_flight`` requests run at once (the gRPC client is thread-safe), so the
    server's dynamic batcher can merge them. The HTTP client (gevent) works only from the thread
    that made it: every HTTP call goes through one thread, so at most one is in flight.

    Pixels travel as uint8 (what the decoder ships; the exported graph casts them itself), 4x
    fewer bytes than float32; a model exported before that (FP32 input) gets ``value / 255``.
    Only ``outputs`` come back (the head's: :func:`adcore.engine.head_outputs`).

    Args:
        client: A :class:`TritonClient` on the served model.
        max_batch: Largest batch per request (at most the model's ``max_batch_size``).
        in_flight: Requests sent ahead of the one being consumed.
        outputs: Outputs to fetch; None: every output the model has.
    """

    input_dtype = "uint8"  # Scorer.forward hands the frames over as they are

    def __init__(
        self,
        client: TritonClient,
        max_batch: int = 16,
        in_flight: int = DEFAULT_IN_FLIGHT,
        outputs: tuple[str, ...] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.client = client
        self.max_batch = max_batch
        self.outputs = None if outputs is None else list(outputs)
        pinned = client.protocol == "http"
        self.in_flight = min(in_flight, 1) if pinned else in_flight
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton") if pinned else None

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if self._thread is None:
            return self._infer(pixels)
        return self._thread.submit(self._infer, pixels).result()

    def _infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        from adcore.scorer import INPUT_NAME, as_float, as_uint8  # torch: only once a request is made

        served = self.client.input_dtypes.get(INPUT_NAME)
        x = as_uint8(pixels) if served == "UINT8" else as_float(pixels)
        return from_triton(self.client.infer({INPUT_NAME: x}, outputs=self.outputs))

    def close(self) -> None:
        """Close the client (from its own thread, for HTTP) and stop that thread."""
        if self._thread is None:
            self.client.close()
            return
        self._thread.submit(self.client.close).result()
        self._thread.shutdown()
