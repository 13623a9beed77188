"""Write a Triton model repository for any ONNX model with named inputs and outputs.

One ONNX file becomes two models in the same repository:

* ``<name>``: ``backend: "python"``, runs onnxruntime inside Triton's Python backend.
  This is what the CPU ``tritonserver`` bundled in ``nvidia-pytriton`` can load
  (it ships the Python backend only).
* ``<name>_ort``: ``backend: "onnxruntime"``, ``KIND_GPU``, for NVIDIA's Triton
  container on GPU hosts (see ``cluster/README.md``).

Both read ``<repo>/<model>/<version>/model.onnx``; the ONNX is hard-linked when
possible and copied otherwise, so the repository never points outside itself.

Each model folder holds a ``manifest.json`` with the sha256 and size of its files (graph,
external weights, ``model.py``, ``config.pbtxt``). :func:`verify_repository` checks them before a
server starts (:class:`adcore.serving.LocalTriton` does; run it before NVIDIA's container too),
and the Python-backend model checks its graph again when Triton loads it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from adcore.integrity import file_problem, name_problem, sha256_file

ORT_SUFFIX = "_ort"
ONNX_FILENAME = "model.onnx"  # the onnxruntime backend's default_model_filename
MANIFEST = "manifest.json"  # in each model folder, beside config.pbtxt (Triton ignores it)
MANIFEST_FORMAT = "adcore-triton-model/1"

# Triton data types (config.pbtxt spells them TYPE_<x>) keyed by ONNX TensorProto enum.
_ONNX_TO_TRITON = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.STRING: "STRING",
}
_TRITON_DTYPES = frozenset(_ONNX_TO_TRITON.values())
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Characters a protobuf text-format string literal must escape; other control characters become octal.
_PBTXT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Parameters the Python-backend model.py reads; callers' ``parameters`` may not override them.
_PYTHON_PARAMETERS = ("intra_op_num_threads", "onnx_filename")


# model.py of the Python-backend model. Written as text: it runs inside Triton's stub
# process (where ``triton_python_backend_utils`` exists), never in the caller.
PYTHON_MODEL_SOURCE = '''"""Triton Python-backend model: onnxruntime on CPU (written by adcore.serving.repository)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def check_files(model_dir, version, onnx_filename):
    """Every file of this version matches the sha256 the repository's manifest.json lists."""
    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    files = {k: v for k, v in manifest["files"].items() if k.split("/")[0] == version}
    if f"{version}/{onnx_filename}" not in files:
        raise ValueError(f"{model_dir}/manifest.json does not list {version}/{onnx_filename}: refused")
    for name, entry in files.items():
        digest = hashlib.sha256()
        with open(Path(model_dir) / name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise ValueError(f"{model_dir}/{name}: sha256 differs from manifest.json: refused, write the model again")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        onnx_filename = params.get("onnx_filename", "model.onnx")
        check_files(args["model_repository"], args["model_version"], onnx_filename)
        onnx_path = Path(args["model_repository"]) / args["model_version"] / onnx_filename
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_num_threads", "0"))
        options.inter_op_num_threads = 1
        # Spinning threads burn the few shared cores between requests (measured: median 75 ms -> 30 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.batched = config.get("max_batch_size", 0) > 0
        self.inputs = [c["name"] for c in config["input"]]
        self.outputs = {c["name"]: pb_utils.triton_string_to_numpy(c["data_type"]) for c in config["output"]}

    def execute(self, requests):
        try:
            feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
            # Only what the callers asked for (none named: every output), computed once for the whole batch.
            wanted = [list(r.requested_output_names()) or list(self.outputs) for r in requests]
            names = [n for n in self.outputs if any(n in w for w in wanted)]
            if self.batched and len(requests) > 1:
                # One onnxruntime call for everything the dynamic batcher gathered.
                sizes = [len(f[self.inputs[0]]) for f in feeds]
                merged = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
                results = self.session.run(names, merged)
                bounds = np.cumsum(sizes)[:-1]
                per_request = list(zip(*[np.split(r, bounds) for r in results]))
            else:
                per_request = [self.session.run(names, f) for f in feeds]
        except Exception as exc:  # report to every caller instead of crashing the stub
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(value.astype(self.outputs[name], copy=False)))
                    for name, value in zip(names, values)
                    if name in want
                ]
            )
            for values, want in zip(per_request, wanted)
        ]

    def finalize(self):
        self.session = None
'''


@dataclass
class TensorSpec:
    """A named model input or output.

    Attributes:
        name: Tensor name; must match the ONNX graph.
        dtype: Triton data type without the ``TYPE_`` prefix, e.g. ``"FP32"``.
        dims: Shape without the batch dimension, as clients see it; -1 marks a dynamic axis.
            Triton rejects empty dims: a batch-only tensor is ``dims=[1], reshape=[]``.
        reshape: The shape the model itself has (without the batch dimension) when it
            differs from ``dims``; None writes no ``reshape``.
    """

    name: str
    dtype: str
    dims: list[int] = field(default_factory=list)
    reshape: list[int] | None = None

    def __post_init__(self) -> None:
        self.dtype = self.dtype.upper().removeprefix("TYPE_")
        if self.dtype not in _TRITON_DTYPES:
            raise ValueError(
                f"TensorSpec {self.name!r}: unknown dtype {self.dtype!r}; use one of {sorted(_TRITON_DTYPES)}"
            )
        self.dims = _checked_shape(self.name, "dims", self.dims)
        if not self.dims:
            raise ValueError(f"TensorSpec {self.name!r}: Triton rejects empty dims; use dims=[1], reshape=[]")
        if self.reshape is not None:
            self.reshape = _checked_shape(self.name, "reshape", self.reshape)
            if -1 not in self.dims + self.reshape and math.prod(self.dims) != math.prod(self.reshape):
                raise ValueError(
                    f"TensorSpec {self.name!r}: reshape {self.reshape} does not have the size of dims {self.dims}"
                )

    @property
    def model_dims(self) -> list[int]:
        """The shape (without the batch dimension) the model's graph has."""
        return self.dims if self.reshape is None else self.reshape

    def to_pbtxt(self) -> str:
        lines = [
            f"    name: {_quote(self.name)}",
            f"    data_type: TYPE_{self.dtype}",
            f"    dims: {_int_list(self.dims)}",
        ]
        if self.reshape is not None:
            lines.append(f"    reshape: {{ shape: {_int_list(self.reshape)} }}")
        return "  {\n" + "\n".join(lines) + "\n  }"


def _checked_shape(name: str, what: str, shape: list[int]) -> list[int]:
    """``shape`` as ints; each axis positive or -1 (dynamic)."""
    shape = [int(d) for d in shape]
    if any(d == 0 or d < -1 for d in shape):
        raise ValueError(f"TensorSpec {name!r}: {what} must be positive or -1, got {shape}")
    return shape


def _int_list(values: list[int] | tuple[int, ...]) -> str:
    """A protobuf text-format list, e.g. ``[ 4, 8 ]`` or ``[ ]``."""
    inner = ", ".join(str(v) for v in values)
    return f"[ {inner} ]" if inner else "[ ]"


def _quote(value: str) -> str:
    """``value`` as a protobuf text-format string literal: quoted, with escapes.

    Every string written into config.pbtxt goes through here, so a name or a parameter
    value holding a quote, a backslash or a newline reads back unchanged in Triton.
    """
    return '"' + "".join(_escape_char(c) for c in str(value)) + '"'


def _escape_char(c: str) -> str:
    """One character of a text-format string literal (non-ASCII stays as is: the file is UTF-8)."""
    if c in _PBTXT_ESCAPES:
        return _PBTXT_ESCAPES[c]
    return f"\\{ord(c):03o}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def write_model_repository(
    onnx_path: str | os.PathLike,
    repo_dir: str | os.PathLike,
    model_name: str,
    version: int,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int = 32,
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16),
    max_queue_delay_us: int = 2000,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
    intra_op_num_threads: int = 0,
    ort_instance_kind: str = "KIND_GPU",
    parameters: dict[str, str] | None = None,
    sha256: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``<model_name>`` (Python backend) and ``<model_name>_ort`` (onnxruntime backend).

    Args:
        onnx_path: The exported model; names, dtypes and ranks are checked against ``inputs``/``outputs``.
        repo_dir: Repository root; created if missing. Existing model folders of the same names are replaced.
        model_name: Name of the Python-backend model; the onnxruntime one gets ``_ort`` appended.
        version: Version folder name (a positive integer).
        inputs: Input tensors (dims without the batch dimension when ``max_batch_size > 0``).
        outputs: Output tensors.
        max_batch_size: Triton's largest batch; 0 disables batching (dims are then full shapes).
        preferred_batch_sizes: Sizes the dynamic batcher aims for; each must be <= ``max_batch_size``.
        max_queue_delay_us: How long the dynamic batcher waits to fill a batch.
        instance_kind: ``instance_group`` kind of the Python-backend model.
        instance_count: Instances per model.
        intra_op_num_threads: onnxruntime threads in the Python backend (0 = onnxruntime's default).
        ort_instance_kind: ``instance_group`` kind of the onnxruntime-backend model.
        parameters: Extra ``parameters`` entries written into both config.pbtxt files (e.g. the
            identity of the artifact the ONNX came from); the Python-backend model's own keys
            (``intra_op_num_threads``, ``onnx_filename``) may not be among them.
        sha256: What the graph's files must hash to (``{file name: hex digest}``, the graph and
            its external weights, e.g. from the engine cache's manifest); the copies in the
            repository are checked against it. None: the digests are taken from the copies.

    Returns:
        ``{model_name: dir, model_name + "_ort": dir}``.

    Raises:
        RepositoryError: a copied file does not hash to its ``sha256``.
    """
    onnx_path = Path(onnx_path)
    repo_dir = Path(repo_dir)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if not _NAME_RE.match(model_name):
        raise ValueError(f"model_name {model_name!r} must match {_NAME_RE.pattern}")
    if int(version) < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    if not inputs or not outputs:
        raise ValueError("write_model_repository needs at least one input and one output TensorSpec")
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if max_batch_size and bad:
        raise ValueError(f"preferred_batch_sizes {bad} not in [1, max_batch_size={max_batch_size}]")
    for kind in (instance_kind, ort_instance_kind):
        if kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
            raise ValueError(f"instance kind {kind!r} must be KIND_CPU, KIND_GPU or KIND_AUTO")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    extra = _checked_parameters(parameters)

    proto = onnx.load(str(onnx_path), load_external_data=False)
    _check_against_onnx(proto, onnx_path, inputs, outputs, batched=max_batch_size > 0)
    external = external_data_files(proto)

    common = dict(
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes if max_batch_size else (),
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count,
    )
    dirs: dict[str, Path] = {}
    for name, backend, kind in (
        (model_name, "python", instance_kind),
        (model_name + ORT_SUFFIX, "onnxruntime", ort_instance_kind),
    ):
        model_dir = repo_dir / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        version_dir = model_dir / str(int(version))
        version_dir.mkdir(parents=True)
        _link_or_copy(onnx_path, version_dir / ONNX_FILENAME)
        for rel in external:
            _link_or_copy(onnx_path.parent / rel, version_dir / rel)
        params = {}
        if backend == "python":
            (version_dir / "model.py").write_text(PYTHON_MODEL_SOURCE)
            params = {"intra_op_num_threads": str(int(intra_op_num_threads)), "onnx_filename": ONNX_FILENAME}
        config = _config_pbtxt(name, backend, kind=kind, parameters={**params, **extra}, **common)
        (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
        _write_manifest(model_dir, version_dir, [ONNX_FILENAME, *external], sha256)
        dirs[name] = model_dir
    return dirs


class RepositoryError(RuntimeError):
    """A Triton model folder is incomplete or differs from its manifest."""


def _write_manifest(model_dir: Path, version_dir: Path, graph_files: list[str], sha256: dict[str, str] | None) -> None:
    """``<model>/manifest.json``: sha256 and size of every file of the model, the graph's checked against ``sha256``."""
    files = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    for name in graph_files if sha256 is not None else ():
        got = files[f"{version_dir.name}/{name}"]["sha256"]
        if sha256.get(name) != got:
            raise RepositoryError(
                f"{version_dir / name}: sha256 {got[:12]}... is not the graph's {str(sha256.get(name))[:12]}...: "
                "its source changed while it was copied; refused"
            )
    (model_dir / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def verify_repository(repo_dir: str | os.PathLike, models: list[str] | None = None) -> None:
    """Check every file of ``models`` (default: every model folder) against its ``manifest.json``.

    Raises:
        RepositoryError: a manifest is missing, names a path outside its folder, or a file is
            missing, altered, or a graph/code file the manifest does not list.
    """
    repo_dir = Path(repo_dir)
    names = models if models is not None else sorted(p.parent.name for p in repo_dir.glob("*/config.pbtxt"))
    for model in names:
        model_dir = repo_dir / model
        try:
            manifest = json.loads((model_dir / MANIFEST).read_text())
            files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
        except (OSError, ValueError, KeyError, AttributeError):
            files = None
        if not isinstance(files, dict):
            raise RepositoryError(f"{model_dir} has no readable {MANIFEST}: write the model again with jobs/export.py")
        for rel, entry in files.items():
            problem = name_problem(rel) or file_problem(model_dir, rel, entry["sha256"], entry["size"])
            if problem:
                raise RepositoryError(f"Triton model file {model_dir / rel}: {problem} ({MANIFEST}); refused")
        unlisted = sorted(
            p.relative_to(model_dir).as_posix()
            for p in model_dir.rglob("*")
            if p.is_file() and p.relative_to(model_dir).as_posix() not in (MANIFEST, *files)
        )
        if unlisted:
            raise RepositoryError(f"{model_dir}: files {unlisted} are not in its {MANIFEST}; refused")


def _checked_parameters(parameters: dict[str, str] | None) -> dict[str, str]:
    """Caller's config.pbtxt ``parameters`` as strings (Triton's only kind); fail on the reserved keys."""
    extra = {str(k): str(v) for k, v in (parameters or {}).items()}
    reserved = sorted(set(extra) & set(_PYTHON_PARAMETERS))
    if reserved:
        raise ValueError(f"parameters {reserved} are set by write_model_repository itself; use its arguments")
    return extra


def _config_pbtxt(
    name: str,
    backend: str,
    *,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    preferred_batch_sizes: tuple[int, ...],
    max_queue_delay_us: int,
    kind: str,
    instance_count: int,
    parameters: dict[str, str],
) -> str:
    """The text of one model's config.pbtxt: every option is written here, nothing edits it later."""
    lines = [
        f"name: {_quote(name)}",
        f"backend: {_quote(backend)}",
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(t.to_pbtxt() for t in inputs) + "\n]",
        "output [\n" + ",\n".join(t.to_pbtxt() for t in outputs) + "\n]",
    ]
    if max_batch_size > 0:
        lines.append(
            "dynamic_batching {\n"
            + (f"  preferred_batch_size: {_int_list(preferred_batch_sizes)}\n" if preferred_batch_sizes else "")
            + f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}"
        )
    lines.append(f"instance_group [\n  {{\n    count: {int(instance_count)}\n    kind: {kind}\n  }}\n]")
    for key, value in parameters.items():
        lines.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def _check_against_onnx(
    proto: onnx.ModelProto, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], batched: bool
) -> None:
    """Fail early (with the file name) when specs and graph disagree; Triton's own error comes much later."""
    initializers = {init.name for init in proto.graph.initializer}
    graph_io = {
        "input": {v.name: v for v in proto.graph.input if v.name not in initializers},
        "output": {v.name: v for v in proto.graph.output},
    }
    for role, specs in (("input", inputs), ("output", outputs)):
        known = graph_io[role]
        for spec in specs:
            if spec.name not in known:
                raise ValueError(f"{path}: no graph {role} named {spec.name!r}; the graph has {sorted(known)}")
            ttype = known[spec.name].type.tensor_type
            onnx_dtype = _ONNX_TO_TRITON.get(ttype.elem_type)
            if onnx_dtype != spec.dtype:
                raise ValueError(f"{path}: {role} {spec.name!r} is {onnx_dtype} in the graph, spec says {spec.dtype}")
            if ttype.HasField("shape"):
                rank = len(ttype.shape.dim)
                want = len(spec.model_dims) + (1 if batched else 0)
                if rank != want:
                    raise ValueError(
                        f"{path}: {role} {spec.name!r} has rank {rank} in the graph, spec shape {spec.model_dims} "
                        f"gives rank {want} ({'with' if batched else 'without'} the batch dimension)"
                    )
    missing = sorted(set(graph_io["input"]) - {s.name for s in inputs})
    if missing:
        raise ValueError(f"{path}: graph inputs {missing} have no TensorSpec")


def external_data_files(proto: onnx.ModelProto) -> list[str]:
    """Relative paths of external-data files the ONNX refers to (empty for a self-contained file)."""
    files = set()
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    if os.path.isabs(entry.value) or ".." in Path(entry.value).parts:
                        raise ValueError(f"external data location {entry.value!r} escapes the model folder")
                    files.add(entry.value)
    return sorted(files)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk, no symlink leaving the repo), or copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
