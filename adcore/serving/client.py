"""A small Triton client with retries: NumPy arrays in, NumPy arrays out, over HTTP or gRPC."""

from __future__ import annotations

import re
import threading
import time

import numpy as np

from adcore.errors import UserError

# Server answers that mean "not there right now" (worth another try), per protocol.
_RETRY_STATUS = {
    "http": {"502", "503", "504"},
    "grpc": {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"},
}
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)?[^/@\s]*@", re.IGNORECASE)  # "user:pass@" in a URL


class TritonUnavailableError(UserError, ConnectionError):
    """The server could not be reached after every retry."""


class TritonClient:
    """Infer on one Triton model with named NumPy inputs and outputs.

    Input and output names and dtypes are read from the model's metadata at first use;
    inputs are cast to the dtype the model declares.

    Args:
        url: ``host:port`` of the server's HTTP or gRPC endpoint.
        model_name: Model to call.
        protocol: ``"http"`` or ``"grpc"``.
        timeout_s: Per-call connection and network timeout.
        retries: Extra attempts after the first on connection errors or "unavailable".
        backoff_s: First wait between attempts; doubles each retry.
        model_version: Version to call; "" lets the server choose.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        protocol: str = "http",
        timeout_s: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        model_version: str = "",
    ):
        if protocol not in _RETRY_STATUS:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")
        self.url = url
        self.model_name = model_name
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.model_version = model_version
        self._client = None
        self._lock = threading.Lock()
        self._inputs: dict[str, str] | None = None  # name -> Triton dtype
        self._outputs: list[str] | None = None

    @property
    def safe_url(self) -> str:
        """The URL without any ``user:password@`` part, for messages."""
        return _USERINFO.sub(r"\1", self.url)

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` and return ``outputs`` by name (None: every output).

        Only the outputs asked for cross the network (and, with adcore's Python-backend
        models, only those are computed).
        """
        self._ensure_metadata()
        unknown = sorted(set(inputs) - set(self._inputs))
        missing = sorted(set(self._inputs) - set(inputs))
        if unknown or missing:
            raise ValueError(
                f"model {self.model_name!r} at {self.safe_url} takes inputs {sorted(self._inputs)}; "
                f"unknown {unknown}, missing {missing}"
            )
        names = list(self._outputs) if outputs is None else list(outputs)
        strange = sorted(set(names) - set(self._outputs))
        if strange or not names:
            raise ValueError(
                f"model {self.model_name!r} at {self.safe_url} has outputs {self._outputs}; asked for {names}"
            )
        arrays = {name: _as_dtype(np.asarray(inputs[name]), self._inputs[name]) for name in self._inputs}
        return self._with_retries(lambda: self._infer_once(arrays, names), "infer")

    @property
    def input_dtypes(self) -> dict[str, str]:
        """The model's inputs and their Triton dtypes (e.g. ``{"pixel_values": "UINT8"}``), from its metadata."""
        self._ensure_metadata()
        return dict(self._inputs)

    def statistics(self) -> dict[str, int]:
        """The server's cumulative counters for this model: ``inference_count`` (images, i.e. batch rows),
        ``execution_count`` (model executions: batches the dynamic batcher formed) and ``request_count``.

        The average batch the server formed between two calls is the difference of
        ``inference_count`` over the difference of ``execution_count``.
        """

        def fetch():
            client = self._get_client()
            if self.protocol == "grpc":
                return client.get_inference_statistics(
                    self.model_name, self.model_version, as_json=True, client_timeout=self.timeout_s
                )
            return client.get_inference_statistics(self.model_name, self.model_version)

        stats = self._with_retries(fetch, "get_inference_statistics")
        totals = {"inference_count": 0, "execution_count": 0, "request_count": 0}
        for model in stats.get("model_stats", []):
            totals["inference_count"] += int(model.get("inference_count", 0))
            totals["execution_count"] += int(model.get("execution_count", 0))
            totals["request_count"] += int(model.get("inference_stats", {}).get("success", {}).get("count", 0))
        return totals

    def is_ready(self) -> bool:
        """True when the server answers and the model is loaded (one attempt, no retries)."""
        try:
            client = self._get_client()
            if self.protocol == "grpc":
                return bool(client.is_model_ready(self.model_name, self.model_version, client_timeout=self.timeout_s))
            return bool(client.is_model_ready(self.model_name, self.model_version))
        except Exception:  # noqa: BLE001 (any failure means "not ready")
            self._reset()
            return False

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _infer_once(self, arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        mod = self._module()
        client = self._get_client()
        request = []
        for name, array in arrays.items():
            tensor = mod.InferInput(name, list(array.shape), self._inputs[name])
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        wanted = [mod.InferRequestedOutput(name) for name in names]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = client.infer(self.model_name, request, model_version=self.model_version, outputs=wanted, **kwargs)
        return {name: result.as_numpy(name) for name in names}

    def _ensure_metadata(self) -> None:
        if self._inputs is not None:
            return

        def fetch():
            client = self._get_client()
            if self.protocol == "grpc":
                return client.get_model_metadata(
                    self.model_name, self.model_version, as_json=True, client_timeout=self.timeout_s
                )
            return client.get_model_metadata(self.model_name, self.model_version)

        meta = self._with_retries(fetch, "get_model_metadata")
        self._inputs = {t["name"]: t["datatype"] for t in meta["inputs"]}
        self._outputs = [t["name"] for t in meta["outputs"]]

    def _with_retries(self, call, what: str):
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return call()
            except Exception as exc:
                if not self._retryable(exc):
                    raise
                last = exc
                self._reset()  # pooled connections to a restarted server are stale
        cause = str(last).replace(self.url, self.safe_url) or type(last).__name__
        raise TritonUnavailableError(
            f"Triton at {self.safe_url} ({self.protocol}, model {self.model_name!r}) unavailable: {what} failed "
            f"{self.retries + 1} times; last error {type(last).__name__}: {cause}"
        ) from last

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, (OSError, TimeoutError)):  # refused, reset, socket timeouts
            return True
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        if isinstance(exc, InferenceServerException):
            return str(exc.status()) in _RETRY_STATUS[self.protocol]
        return type(exc).__module__.startswith("gevent")  # geventhttpclient's timeouts

    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as mod  # noqa: PLC0415
        else:
            import tritonclient.http as mod  # noqa: PLC0415
        return mod

    def _get_client(self):
        with self._lock:  # gRPC calls come from several threads: one client for all of them
            if self._client is None:
                mod = self._module()
                if self.protocol == "grpc":
                    self._client = mod.InferenceServerClient(self.url)
                else:
                    self._client = mod.InferenceServerClient(
                        self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                    )
            return self._client

    def _reset(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 (closing a broken connection may fail; nothing to keep)
                pass
            self._client = None


def _as_dtype(array: np.ndarray, triton_dtype: str) -> np.ndarray:
    """Cast to the model's declared dtype (e.g. float64 -> FP32); BYTES/BF16 go through unchanged."""
    from tritonclient.utils import triton_to_np_dtype  # noqa: PLC0415

    target = triton_to_np_dtype(triton_dtype)
    if target is None or target is np.object_ or triton_dtype == "BF16":
        return array
    return np.ascontiguousarray(array, dtype=target)
