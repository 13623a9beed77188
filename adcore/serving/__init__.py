"""Serving adcore models with Triton: model repositories, a local CPU server, a retrying client.

``write_model_repository`` turns any ONNX model with named inputs/outputs into a Python-backend
model (CPU ``tritonserver`` from nvidia-pytriton) and an ``_ort`` onnxruntime-backend twin
(NVIDIA's Triton container on GPU hosts). See ``cluster/README.md``.
"""

from adcore.serving.client import TritonClient, TritonUnavailableError
from adcore.serving.network import TritonNetwork
from adcore.serving.repository import (
    ORT_SUFFIX,
    RepositoryError,
    TensorSpec,
    verify_repository,
    write_model_repository,
)
from adcore.serving.triton_server import LocalTriton, TritonStartError, find_tritonserver

__all__ = [
    "ORT_SUFFIX",
    "LocalTriton",
    "RepositoryError",
    "TensorSpec",
    "TritonClient",
    "TritonNetwork",
    "TritonStartError",
    "TritonUnavailableError",
    "find_tritonserver",
    "verify_repository",
    "write_model_repository",
]
