"""A scorer's network as Triton models, tied to the artifact it came from.

:func:`write_triton_repository` writes the graph of :func:`adcore.export.export_onnx` (or a
precision variant) as ``<name>`` and ``<name>_ort`` (:func:`write_model_repository`), with the
artifact's identity (``model_version``, ``fingerprint``) among each config.pbtxt's
``parameters``; :func:`check_served_model` compares a server's answer with the artifact a
scoring job loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from adcore.engine import graph_entry
from adcore.errors import UserError
from adcore.export import variant_filename
from adcore.scorer import INPUT_NAME, OUTPUT_NAMES
from adcore.serving.network import BATCH_ONLY_OUTPUTS
from adcore.serving.repository import ONNX_FILENAME, TensorSpec, write_model_repository

# Keys under ``parameters`` in config.pbtxt that tie a served model to its artifact.
IDENTITY_KEYS = ("model_version", "fingerprint")
# Dynamic batcher targets; those above max_batch_size are dropped.
_PREFERRED_BATCHES = (4, 8, 16)


class ModelMismatchError(UserError, RuntimeError):
    """The model a server runs is not the network of the artifact the caller loaded."""


def tensor_specs(scorer) -> tuple[list, list]:
    """Triton input/output specs (without the batch dimension) of the exported network."""
    size, g, e = int(scorer.input_size), int(scorer.model.grid), int(scorer.model.embedding_dim)
    dims = {"score": [1], "anomaly_map": [g, g], "patch_embeddings": [g * g, e]}
    outputs = [TensorSpec(n, "FP32", dims[n], reshape=[] if n in BATCH_ONLY_OUTPUTS else None) for n in OUTPUT_NAMES]
    return [TensorSpec(INPUT_NAME, "UINT8", [3, size, size])], outputs


def repository_parameters(scorer) -> dict[str, str]:
    """What config.pbtxt records about the artifact: name, integer version, model_version, fingerprint."""
    missing = [k for k in ("model_name", "version", *IDENTITY_KEYS) if k not in scorer.meta]
    if missing:
        raise ValueError(f"scorer has no {missing} in its meta: save it as an artifact before exporting to Triton")
    return {
        "artifact_model_name": str(scorer.meta["model_name"]),
        "artifact_version": str(int(scorer.meta["version"])),
        "model_version": str(scorer.meta["model_version"]),
        "fingerprint": str(scorer.meta["fingerprint"]),
    }


def write_triton_repository(
    scorer,
    onnx_path: str | os.PathLike,
    repo_dir: str | os.PathLike,
    model_name: str | None = None,
    max_batch_size: int = 32,
    intra_op_num_threads: int = 0,
    variant: str = "fp32",
) -> dict[str, Path]:
    """Write ``<name>`` (Python backend, CPU) and ``<name>_ort`` (onnxruntime backend, GPU) for this scorer.

    The repository version is the artifact's integer version; the artifact's
    ``model_version`` and ``fingerprint`` go into each config.pbtxt's ``parameters``
    (check them with :func:`check_served_model`), with the ``variant``. A variant other
    than fp32 is served as ``<name>_<variant>`` (and ``<name>_<variant>_ort``) unless
    ``model_name`` is given. A graph from the engine cache is checked against the cache's
    manifest, and its copies in the repository against the same digests. Returns ``{model: folder}``.

    Raises:
        ArtifactError: the graph (or its external weights) differs from its manifest.
    """
    params = repository_parameters(scorer)
    variant_filename(variant)  # checks the name
    name = model_name or _triton_name(params["artifact_model_name"]) + ("" if variant == "fp32" else f"_{variant}")
    params["variant"] = variant
    inputs, outputs = tensor_specs(scorer)
    entry = graph_entry(onnx_path)
    sha256 = {ONNX_FILENAME: entry["sha256"], **{n: e["sha256"] for n, e in entry.get("external", {}).items()}}
    return write_model_repository(
        onnx_path,
        repo_dir,
        name,
        version=int(params["artifact_version"]),
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(b for b in _PREFERRED_BATCHES if b <= max_batch_size),
        intra_op_num_threads=intra_op_num_threads,
        parameters=params,
        sha256=sha256,
    )


def _triton_name(name: str) -> str:
    """A Triton-safe model name (letters, digits, ``_.-``) from an artifact's model_name."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def served_parameters(model_config: dict) -> dict[str, str]:
    """``parameters`` of a model config as Triton returns it (HTTP JSON or gRPC ``as_json``)."""
    config = model_config.get("config", model_config)
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def check_served_model(model_config: dict, scorer) -> None:
    """Raise :class:`ModelMismatchError` unless the served model was exported from ``scorer``'s artifact.

    Args:
        model_config: The server's answer to ``get_model_config`` for the model.
        scorer: The artifact the caller loaded (for the FAISS head and calibration).
    """
    served = served_parameters(model_config)
    want = {k: str(scorer.meta.get(k)) for k in IDENTITY_KEYS}
    wrong = {k: served.get(k) for k in IDENTITY_KEYS if served.get(k) != want[k]}
    if wrong:
        name = model_config.get("config", model_config).get("name", "?")
        raise ModelMismatchError(
            f"Triton model {name!r} serves {wrong}, but the artifact {scorer.version!r} has "
            f"{ {k: want[k] for k in wrong} }: re-export it with jobs/export.py "
            "or point the job at the matching artifact"
        )
