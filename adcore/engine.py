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

A variant other than fp32 is used only when its record says it is usable: image and pixel
AUROC on the validation split within ``VARIANT_TOLERANCE`` of fp32
(:func:`adcore.evaluate.measure_variants`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

from adcore import storage
from adcore.export import ONNX_FORMAT, OnnxNetwork, export_onnx, read_metadata, variant_filename, write_variant
from adcore.scorer import OUTPUT_NAMES, Network, Scorer, TorchNetwork

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx")
AUTO = "auto"
# A variant is usable when both its image and its pixel AUROC on the validation split stay this close to fp32's.
VARIANT_TOLERANCE = 0.005
CACHE_FOLDER = "onnx"  # inside the artifact folder
CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = "adcore-onnx-cache/1"
_LOCK = ".lock"


class VariantNotUsableError(RuntimeError):
    """A quantised variant was asked for that was not measured, or that lost accuracy."""


def choose_engine(requested: str = AUTO, device: str | None = None, variant: str = "fp32") -> str:
    """The engine that runs the network: ``requested`` unless it is ``"auto"``.

    ``auto``: torch on a CUDA device (``device`` "cuda..."; None: CUDA when torch sees it),
    onnxruntime on CPU; any variant but fp32 needs onnxruntime. The choice is logged.
    """
    if requested not in (AUTO, *ENGINES):
        raise ValueError(f"engine must be one of {[AUTO, *ENGINES]}, got {requested!r}")
    variant_filename(variant)  # checks the name
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
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
    return json.loads(path.read_text())


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


def _usable_file(path: Path, scorer: Scorer) -> bool:
    """A cached graph of this artifact and format (a stale or foreign file is redone)."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 (unreadable: export again)
        return False
    return meta.get("fingerprint") == scorer.meta.get("fingerprint") and meta.get("adcore_onnx_format") == ONNX_FORMAT


def ensure_onnx(scorer: Scorer, variant: str = "fp32") -> Path:
    """The cached graph of ``variant``, exported (fp32) or derived from fp32 only when the cache lacks it."""
    name = variant_filename(variant)
    folder = cache_dir(scorer)
    path = folder / name
    if _usable_file(path, scorer):
        return path
    with _locked(folder):
        if _usable_file(path, scorer):  # another replica wrote it while this one waited
            return path
        if _download(scorer, folder, name):
            return path
        manifest = read_manifest(folder)
        fp32 = folder / variant_filename("fp32")
        if not _usable_file(fp32, scorer):
            log.info("exporting %s to ONNX into %s (once per artifact)", scorer.version, folder)
            _atomic(fp32, lambda tmp: export_onnx(scorer, tmp))
            manifest["files"]["fp32"] = _entry(fp32)
        if variant != "fp32":
            log.info("writing the %s variant of %s", variant, scorer.version)
            _atomic(path, lambda tmp: write_variant(fp32, variant, tmp))
            manifest["files"][variant] = _entry(path)
        manifest.update(format=CACHE_FORMAT, model_version=scorer.version, fingerprint=scorer.meta["fingerprint"])
        _write_manifest(folder, manifest)
    return path


def _entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size}


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` into a temporary name beside ``path``, then renamed: readers never see half a file."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.onnx")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _download(scorer: Scorer, folder: Path, name: str) -> bool:
    """Fetch ``name`` (and the manifest) from ``<s3 artifact>/onnx/<key>/`` when the artifact is on S3 and has it."""
    uri = getattr(scorer, "artifact_uri", None)
    if not uri or not storage.is_s3(uri):
        return False
    remote = storage.join(uri, CACHE_FOLDER, cache_key(scorer))
    if not storage.exists(storage.join(remote, name)):
        return False
    log.info("downloading the cached ONNX %s of %s", name, scorer.version)
    _atomic(folder / name, lambda tmp: storage.write_bytes(tmp, storage.read_bytes(storage.join(remote, name))))
    with contextlib.suppress(FileNotFoundError):
        storage.write_bytes(folder / CACHE_MANIFEST, storage.read_bytes(storage.join(remote, CACHE_MANIFEST)))
    return _usable_file(folder / name, scorer)


def upload_cache(scorer: Scorer, uri: str) -> None:
    """Copy the scorer's engine cache to ``<uri>/onnx/<key>/`` (an ``s3://`` artifact), manifest last."""
    folder = cache_dir(scorer)
    remote = storage.join(uri, CACHE_FOLDER, cache_key(scorer))
    manifest = read_manifest(folder)
    for entry in manifest["files"].values():
        storage.write_bytes(storage.join(remote, entry["file"]), (folder / entry["file"]).read_bytes())
    storage.write_bytes(storage.join(remote, CACHE_MANIFEST), (folder / CACHE_MANIFEST).read_bytes())


def check_usable(scorer: Scorer, variant: str) -> dict:
    """The measurement that allows ``variant``; raises :class:`VariantNotUsableError` if there is none or it failed."""
    if variant == "fp32":
        return {}
    measured = (read_manifest(cache_dir(scorer)).get("measured") or {}).get("variants", {})
    record = measured.get(variant)
    if record is None:
        raise VariantNotUsableError(
            f"variant {variant} of {scorer.version} was never measured: run `python jobs/export.py --model ... "
            f"--data BMAD_DIR --variants fp32,{variant}` (validation AUROC within {VARIANT_TOLERANCE} of fp32)"
        )
    if not record.get("usable"):
        raise VariantNotUsableError(
            f"variant {variant} of {scorer.version} lost accuracy: validation image/pixel AUROC "
            f"{record.get('image_auroc')} / {record.get('pixel_auroc')} vs fp32 "
            f"{measured['fp32'].get('image_auroc')} / {measured['fp32'].get('pixel_auroc')} "
            f"(tolerance {VARIANT_TOLERANCE}); score with fp32"
        )
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
        check_usable(scorer, variant)
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
