"""Which engine runs a scorer's network, and the exported graphs each artifact keeps for it.

    scorer = load_scorer("out/models/pc")              # engine "auto": onnxruntime on CPU, torch on CUDA
    scorer = load_scorer(uri, engine="onnx", variant="int8", threads=2)

On CPU onnxruntime runs the same network 1.4-2.7x faster than torch (README, Measured); on a
CUDA device torch stays. The ONNX graph is exported once per artifact and kept in its
engine cache, ``<artifact>/onnx/<key>/`` (``key`` = the artifact's fingerprint and the graph
format), beside the precision variants (``model.int8.onnx``, ``model.fp16.onnx``) and a
``manifest.json`` that lists them and records what ``jobs/export.py`` measured for each. A
read-only artifact folder gets the same cache under ``$ADCORE_CACHE/onnx/<key>/`` (default
``~/.cache/adcore``). Replicas on one node share the cache: the first exports under a file
lock, the others wait and load what it wrote. For an ``s3://`` artifact the cache is looked
up at ``<uri>/onnx/<key>/`` first (``jobs/export.py`` uploads it there), so the nodes of a
cluster download the graphs instead of exporting them again.

Every graph file (and the side file of external weights a graph may have) is listed in the
cache's manifest with its sha256 and size; a graph is loaded, downloaded, uploaded or served
only when it matches, and an altered one is refused (:class:`adcore.artifact.ArtifactError`).

A variant other than fp32 is used only when its record says it is usable: image and pixel
AUROC on the validation split within ``VARIANT_TOLERANCE`` of fp32, and its network faster than
fp32's on the device it was timed on (:func:`adcore.evaluate.measure_variants`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Literal

import onnx

from adcore import storage
from adcore.artifact import ArtifactError
from adcore.errors import UserError
from adcore.export import (
    FORMAT_KEY,
    ONNX_FORMAT,
    OnnxNetwork,
    export_onnx,
    variant_filename,
    write_variant,
)
from adcore.integrity import file_problem, name_problem, sha256_file
from adcore.scorer import OUTPUT_NAMES, Network, Scorer, TorchNetwork
from adcore.serving.repository import external_data_files

log = logging.getLogger(__name__)

EngineName = Literal["auto", "torch", "onnx"]  # the --engine flag of the entry points
AUTO = "auto"
ENGINES = tuple(e for e in typing.get_args(EngineName) if e != AUTO)
# A variant is usable when both its image and its pixel AUROC on the validation split stay this close to fp32's.
VARIANT_TOLERANCE = 0.005
CACHE_FOLDER = "onnx"  # inside the artifact folder
CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = "adcore-onnx-cache/2"  # 2: every graph file with its sha256 (1 had none: its graphs are redone)
_LOCK = ".lock"


class VariantNotUsableError(UserError, RuntimeError):
    """A quantised variant was asked for that was not measured, or that lost accuracy."""


def choose_engine(requested: str = AUTO, device: str | None = None, variant: str = "fp32") -> str:
    """The engine that runs the network: ``requested`` unless it is ``"auto"``.

    ``auto``: torch on a CUDA device (``device`` "cuda..."; None: CUDA when torch sees it),
    onnxruntime on CPU; any variant but fp32 needs onnxruntime. The choice is logged.
    """
    if requested not in (AUTO, *ENGINES):
        raise ValueError(f"engine must be one of {[AUTO, *ENGINES]}, got {requested!r}")
    variant_filename(variant)  # checks the name
    device = device or default_device()
    if requested == "torch" and variant != "fp32":
        raise ValueError(f"variant {variant!r} is an ONNX graph: use engine 'onnx' or 'auto', not 'torch'")
    if requested != AUTO:
        engine, why = requested, "asked for"
    elif variant != "fp32":
        engine, why = "onnx", f"variant {variant}"
    elif str(device).startswith("cuda"):
        engine, why = "torch", "CUDA device"
    else:
        engine, why = "onnx", "CPU: onnxruntime runs the network faster than torch there"
    log.info("network engine: %s (%s; device %s, variant %s)", engine, why, device, variant)
    return engine


def default_threads() -> int:
    """The CPUs this process may run on (a Ray actor's share, a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cache_key(scorer: Scorer) -> str:
    """Names the exported graphs of one artifact: its fingerprint and the graph format."""
    fingerprint = scorer.meta.get("fingerprint")
    if not fingerprint:
        raise ValueError("the scorer has no fingerprint: save it as an artifact before exporting it")
    return f"{fingerprint[:16]}-g{ONNX_FORMAT}"


def cache_dir(scorer: Scorer) -> Path:
    """The scorer's engine cache: inside its artifact folder, or under ``$ADCORE_CACHE`` if that is read-only."""
    key = cache_key(scorer)
    artifact = getattr(scorer, "artifact_path", None)
    if artifact is not None:
        folder = Path(artifact) / CACHE_FOLDER / key
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
    root = Path(os.environ.get("ADCORE_CACHE", Path.home() / ".cache" / "adcore"))
    folder = root / CACHE_FOLDER / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_manifest(folder: Path) -> dict:
    """The cache's manifest (files and measurements), or an empty one."""
    path = Path(folder) / CACHE_MANIFEST
    if not path.is_file():
        return {"format": CACHE_FORMAT, "files": {}, "measured": None}
    return _checked_manifest(path.read_bytes(), str(path))


def _checked_manifest(data: bytes, where: str) -> dict:
    """A cache manifest with every file name and digest checked; an older format keeps its measurements only."""
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ArtifactError(f"{where} is not an ONNX cache manifest: delete it to export the graphs again")
    if manifest.get("format") != CACHE_FORMAT:
        return {"format": CACHE_FORMAT, "files": {}, "measured": manifest.get("measured")}
    for variant, entry in manifest["files"].items():
        for name, item in _graph_files(entry if isinstance(entry, dict) else {}):
            problem = name_problem(name) or ("is not a plain file name" if "/" in name else None)
            if problem or not (isinstance(item.get("sha256"), str) and isinstance(item.get("bytes"), int)):
                raise ArtifactError(
                    f"{where}: the {variant} graph's file {name!r} {problem or 'has no sha256 and size'}: refused"
                )
    return manifest


def _graph_files(entry: dict) -> list[tuple[str, dict]]:
    """(name, {sha256, bytes}) of a manifest entry's graph and of its external-weight files."""
    external = entry.get("external") or {}
    return [(entry.get("file"), entry), *(external.items() if isinstance(external, dict) else [(None, {})])]


def _entry(folder: Path, name: str) -> dict:
    """The manifest entry of graph ``name`` in ``folder``: its digest and those of its external weights."""
    entry = {"file": name, "bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    external = external_data_files(onnx.load(str(folder / name), load_external_data=False))
    if external:
        entry["external"] = {
            n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in external
        }
    return entry


def check_graph(folder: Path, entry: dict) -> dict[str, str]:
    """The graph's metadata, once it and its external weights match their digests and it reads no other file.

    Raises:
        ArtifactError: a file differs from the manifest, or the graph names external data it does not list.
    """
    where = Path(folder) / entry["file"]
    for name, item in _graph_files(entry):
        problem = file_problem(folder, name, item["sha256"], item["bytes"])
        if problem:
            raise ArtifactError(
                f"cached ONNX {Path(folder) / name}: {problem} ({CACHE_MANIFEST} beside it); refused: "
                f"delete {folder} to export the graphs again"
            )
    proto = onnx.load(str(where), load_external_data=False)
    try:
        external = external_data_files(proto)
    except ValueError as e:
        raise ArtifactError(f"cached ONNX {where}: {e}; refused") from None
    if sorted(external) != sorted(name for name, _ in _graph_files(entry)[1:]):
        raise ArtifactError(f"cached ONNX {where} reads external data {external} its manifest does not list; refused")
    return {p.key: p.value for p in proto.metadata_props}


def _write_manifest(folder: Path, manifest: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is read by every replica
    os.replace(tmp, folder / CACHE_MANIFEST)


@contextlib.contextmanager
def _locked(folder: Path):
    """One process at a time in ``folder`` (replicas of one node share its cache)."""
    with open(folder / _LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(folder: Path, variant: str, scorer: Scorer) -> Path | None:
    """The checked graph of ``variant`` in ``folder``, or None if the cache lacks it (or it is another artifact's).

    Raises:
        ArtifactError: the manifest lists the graph but the file (or its external weights) differs.
    """
    entry = read_manifest(folder)["files"].get(variant)
    if entry is None or not (folder / entry["file"]).is_file():
        return None
    path = folder / entry["file"]
    meta = check_graph(folder, entry)
    if meta.get("fingerprint") != scorer.meta.get("fingerprint") or meta.get(FORMAT_KEY) != ONNX_FORMAT:
        return None  # a stale graph: exported again
    return path


def ensure_onnx(scorer: Scorer, variant: str = "fp32") -> Path:
    """The cached graph of ``variant``, exported (fp32) or derived from fp32 only when the cache lacks it.

    Raises:
        ArtifactError: a cached or downloaded graph differs from its manifest's digest.
    """
    variant_filename(variant)  # checks the name
    folder = cache_dir(scorer)
    path = _cached(folder, variant, scorer)
    if path is not None:
        return path
    with _locked(folder):
        path = _cached(folder, variant, scorer)  # another replica wrote it while this one waited
        if path is None:
            path = _download(scorer, folder, variant)
        if path is None:
            fp32 = _cached(folder, "fp32", scorer)
            if fp32 is None:
                log.info("exporting %s to ONNX into %s (once per artifact)", scorer.version, folder)
                fp32 = _write_graph(scorer, folder, "fp32", lambda tmp: export_onnx(scorer, tmp))
            path = fp32
            if variant != "fp32":
                log.info("writing the %s variant of %s", variant, scorer.version)
                path = _write_graph(scorer, folder, variant, lambda tmp: write_variant(fp32, variant, tmp))
    return path


def _write_graph(scorer: Scorer, folder: Path, variant: str, write) -> Path:
    """``write(path)`` in a private folder beside the cache, then moved in (external weights first) and listed.

    Readers never see half a file: each is renamed into place whole, and the manifest that makes
    the graph usable is written last.
    """
    name = variant_filename(variant)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.tmp-"))
    try:
        write(staging / name)
        entry = _entry(staging, name)
        for other, _ in _graph_files(entry)[1:]:
            os.replace(staging / other, folder / other)
        os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _list(scorer, folder, variant, entry)
    return folder / name


def _list(scorer: Scorer, folder: Path, variant: str, entry: dict, measured: dict | None = None) -> None:
    """Record ``entry`` as the graph of ``variant`` (and ``measured``, if the cache has no measurement yet)."""
    manifest = read_manifest(folder)
    manifest["files"][variant] = entry
    if manifest.get("measured") is None:
        manifest["measured"] = measured
    manifest.update(format=CACHE_FORMAT, model_version=scorer.version, fingerprint=scorer.meta["fingerprint"])
    _write_manifest(folder, manifest)


def _remote_manifest(scorer: Scorer) -> tuple[str, dict] | None:
    """``(<s3 artifact>/onnx/<key>, its manifest)`` when the artifact is on S3 and has one."""
    uri = getattr(scorer, "artifact_uri", None)
    if not uri or not storage.is_s3(uri):
        return None
    remote = storage.join(uri, CACHE_FOLDER, cache_key(scorer))
    manifest_uri = storage.join(remote, CACHE_MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    return remote, _checked_manifest(storage.read_bytes(manifest_uri), manifest_uri)


def _download(scorer: Scorer, folder: Path, variant: str) -> Path | None:
    """Fetch ``variant`` from ``<s3 artifact>/onnx/<key>/`` when the artifact is on S3 and lists it there.

    Each file is checked against the remote manifest's digest before it is moved into the cache.
    """
    found = _remote_manifest(scorer)
    entry = found[1]["files"].get(variant) if found else None
    if entry is None:
        return None
    remote, manifest = found
    log.info("downloading the cached ONNX %s of %s", entry["file"], scorer.version)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".download.tmp-"))
    try:
        for name, item in _graph_files(entry):
            storage.write_bytes(staging / name, storage.read_bytes(storage.join(remote, name)))
            problem = file_problem(staging, name, item["sha256"], item["bytes"])
            if problem:
                raise ArtifactError(
                    f"ONNX graph {storage.join(remote, name)}: {problem} ({CACHE_MANIFEST} beside it); refused: "
                    "export it again with jobs/export.py"
                )
        for name, _ in reversed(_graph_files(entry)):  # the graph last
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _list(scorer, folder, variant, entry, manifest.get("measured"))
    return _cached(folder, variant, scorer)


def upload_cache(scorer: Scorer, uri: str) -> None:
    """Copy the engine cache to ``<uri>/onnx/<key>/`` (an ``s3://`` artifact): each graph checked, manifest last."""
    folder = cache_dir(scorer)
    remote = storage.join(uri, CACHE_FOLDER, cache_key(scorer))
    manifest = read_manifest(folder)
    for entry in manifest["files"].values():
        check_graph(folder, entry)
        for name, _ in _graph_files(entry):
            storage.write_bytes(storage.join(remote, name), (folder / name).read_bytes())
    storage.write_bytes(storage.join(remote, CACHE_MANIFEST), (folder / CACHE_MANIFEST).read_bytes())


def graph_entry(path: str | os.PathLike) -> dict:
    """The checked manifest entry of a graph in an engine cache, or digests read from the files of any other graph.

    Raises:
        ArtifactError: the graph is listed in the manifest beside it and differs from it.
    """
    path = Path(path)
    for entry in read_manifest(path.parent)["files"].values():
        if entry["file"] == path.name:
            check_graph(path.parent, entry)
            return entry
    return _entry(path.parent, path.name)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_usable(scorer: Scorer, variant: str, device: str = "cpu") -> dict:
    """The measurement that allows ``variant`` on ``device``; raises :class:`VariantNotUsableError` if there
    is none, it lost accuracy, or it was timed on that device and was not faster than fp32."""
    if variant == "fp32":
        return {}
    found = read_manifest(cache_dir(scorer)).get("measured")
    if found is None and (remote := _remote_manifest(scorer)):  # a node that has not downloaded it yet
        found = remote[1].get("measured")
    timed_on = (found or {}).get("device")
    measured = (found or {}).get("variants", {})
    record = measured.get(variant)
    if record is None:
        raise VariantNotUsableError(
            f"variant {variant} of {scorer.version} was never measured: run `python jobs/export.py --model ... "
            f"--data BMAD_DIR --variants fp32,{variant}` (validation AUROC within {VARIANT_TOLERANCE} of fp32)"
        )
    if not record.get("accurate", record.get("usable")):
        raise VariantNotUsableError(
            f"variant {variant} of {scorer.version} lost accuracy: validation image/pixel AUROC "
            f"{record.get('image_auroc')} / {record.get('pixel_auroc')} vs fp32 "
            f"{measured['fp32'].get('image_auroc')} / {measured['fp32'].get('pixel_auroc')} "
            f"(tolerance {VARIANT_TOLERANCE}); score with fp32"
        )
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    if not record.get("faster", True):
        if timed_on == device:
            raise VariantNotUsableError(
                f"variant {variant} of {scorer.version} ran at {record.get('speed_vs_fp32')}x the speed of fp32 "
                f"on {device}: score with fp32"
            )
        log.warning("variant %s was timed on %s, not on %s: allowed by its accuracy alone", variant, timed_on, device)
    return record


def head_outputs(scorer: Scorer) -> tuple[str, ...]:
    """The network outputs the scorer's head reads (its ``network_outputs``; all of them if it names none)."""
    wanted = tuple(getattr(scorer.head, "network_outputs", OUTPUT_NAMES))
    unknown = sorted(set(wanted) - set(OUTPUT_NAMES))
    if unknown:
        raise ValueError(f"head {type(scorer.head).__name__} asks for unknown network outputs {unknown}")
    return wanted


def load_network(
    source: Scorer | str,
    engine: str = AUTO,
    variant: str = "fp32",
    threads: int | None = None,
    device: str | None = None,
    require_usable: bool = True,
) -> Network:
    """The network backend of an artifact for ``engine`` (see :func:`choose_engine`).

    Args:
        source: A :class:`Scorer` loaded from an artifact, or the artifact's URI.
        engine: ``auto``, ``torch`` or ``onnx``.
        variant: ``fp32``, ``int8`` or ``fp16`` (ONNX graphs from the engine cache).
        threads: onnxruntime intra-op threads; None: every CPU this process may use.
        device: Where torch runs; None: CUDA when torch sees it.
        require_usable: Refuse a variant whose measured AUROC is not within tolerance
            (False only to measure it: ``adcore.evaluate --variant``).
    """
    scorer = load_scorer(source, engine="torch") if isinstance(source, str) else source
    engine = choose_engine(engine, device, variant)
    if engine == "torch":
        return TorchNetwork(scorer.model)
    if require_usable:
        check_usable(scorer, variant, device or default_device())
    path = ensure_onnx(scorer, variant)
    # On CPU the CPU provider alone (an onnxruntime-gpu build would otherwise take a GPU the caller did not pick).
    providers = ["CPUExecutionProvider"] if device is not None and not str(device).startswith("cuda") else None
    return OnnxNetwork(path, threads=threads or default_threads(), providers=providers, outputs=head_outputs(scorer))


def load_scorer(
    artifact: str,
    engine: str = AUTO,
    variant: str = "fp32",
    threads: int | None = None,
    use_gpu: bool | None = None,
    require_usable: bool = True,
) -> Scorer:
    """:meth:`Scorer.load` with its network on the chosen engine (what the scoring job and evaluate use)."""
    import torch

    scorer = Scorer.load(artifact, use_gpu=use_gpu)
    scorer.artifact_uri = storage.absolute(artifact)
    gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    if engine != "torch" or variant != "fp32":
        scorer.network = load_network(scorer, engine, variant, threads, "cuda" if gpu else "cpu", require_usable)
    return scorer


def record_measurement(scorer: Scorer, record: dict) -> None:
    """Keep ``record`` (:func:`adcore.evaluate.measure_variants`) in the cache manifest for :func:`check_usable`."""
    folder = cache_dir(scorer)
    with _locked(folder):
        manifest = read_manifest(folder)
        manifest["measured"] = record
        _write_manifest(folder, manifest)
