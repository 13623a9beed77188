"""The one model artifact format: a directory (local or an S3 prefix) holding

- ``config.json``: the full config, enough to rebuild the model;
- ``weights.safetensors``: the torch state dict;
- ``arrays.safetensors``: named NumPy arrays (centroids, memory bank, text anchors...);
- optional extra files;
- ``manifest.json``: format version plus sha256 and size of every other file.

The manifest is written last, so a directory without one is incomplete; loading
checks every digest before anything is used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from adcore import storage
from adcore.errors import UserError
from adcore.integrity import file_problem, inside, name_problem, sha256_file

FORMAT = "adcore-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
ARRAYS = "arrays.safetensors"
_RESERVED = {MANIFEST, CONFIG, WEIGHTS, ARRAYS}


class ArtifactError(UserError, RuntimeError):
    """An artifact is missing, incomplete, tampered with or of an unknown format."""


@dataclass
class Artifact:
    """A loaded and verified artifact; ``path`` is its local directory."""

    path: Path
    config: dict
    state_dict: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]
    manifest: dict = field(default_factory=dict)


def _write_contents(
    folder: Path,
    config: dict,
    state_dict: dict[str, torch.Tensor],
    arrays: dict[str, np.ndarray],
    extra_files: dict[str, bytes | str | os.PathLike] | None,
) -> dict:
    """Write every file but the manifest into ``folder``; return the manifest."""
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    # safetensors needs contiguous tensors that share no storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS))
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / ARRAYS))
    for name, content in (extra_files or {}).items():
        if name_problem(name) or name in _RESERVED:
            raise ArtifactError(f"extra file name {name!r} is reserved or leaves the artifact")
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            name = p.relative_to(folder).as_posix()
            files[name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_unix": int(time.time()),
        "files": files,
    }


def save_artifact(
    uri: str | os.PathLike,
    config: dict,
    state_dict: dict[str, torch.Tensor],
    arrays: dict[str, np.ndarray],
    extra_files: dict[str, bytes | str | os.PathLike] | None = None,
) -> str:
    """Save an artifact to a local directory or an S3 prefix, replacing any old one.

    Args:
        uri: target directory or ``s3://bucket/prefix``.
        config: JSON-serialisable dict, the full config.
        state_dict: torch tensors (stored on CPU).
        arrays: named NumPy arrays.
        extra_files: relative name -> bytes or a local file to copy.

    Everything is written to a temporary directory first. Locally it is renamed into
    place; on S3 the old manifest is deleted, the files uploaded, and the manifest
    uploaded last (files of an older artifact that the new one lacks stay on S3,
    unlisted and ignored). Returns ``uri`` as a string.
    """
    uri = str(uri)
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="adcore-artifact-") as tmp:
            folder = Path(tmp)
            manifest = _write_contents(folder, config, state_dict, arrays, extra_files)
            # Without its manifest an old artifact reads as incomplete while files change.
            old_manifest = storage.join(uri, MANIFEST)
            if storage.exists(old_manifest):
                fs, path = storage.filesystem_for(old_manifest)
                fs.delete_file(path)
            storage.upload_dir(folder, uri)
            manifest_bytes = json.dumps(manifest, indent=2).encode()
            storage.write_bytes(storage.join(uri, MANIFEST), manifest_bytes)
        return uri

    target = Path(storage.local_path(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        manifest = _write_contents(staging, config, state_dict, arrays, extra_files)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            # Two renames: the old artifact stays whole until the new one replaces it.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "artifact")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return uri


def _read_manifest(folder: Path, uri: str) -> dict:
    path = folder / MANIFEST
    if not path.is_file() or not inside(folder, MANIFEST):
        raise ArtifactError(f"{uri} has no {MANIFEST}: not an artifact, or its write did not finish")
    return _parse_manifest(path.read_bytes(), uri)


def _parse_manifest(data: bytes, uri: str) -> dict:
    """The manifest in ``data``, its format and every file name checked (nothing is fetched before)."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{MANIFEST} of {uri} is not valid JSON: {err}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ArtifactError(f"{MANIFEST} of {uri} is not an {FORMAT} manifest")
    if not isinstance(manifest.get("format_version", 0), int) or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(
            f"{uri} has format version {manifest['format_version']}; this adcore reads up to {FORMAT_VERSION}"
        )
    for name, entry in manifest["files"].items():
        problem = name_problem(name)
        if problem or name == MANIFEST:
            raise ArtifactError(
                f"{MANIFEST} of {uri} lists {name!r}, which {problem or 'is the manifest itself'}: refused, "
                "an artifact holds plain relative paths only"
            )
        if not (
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
        ):
            raise ArtifactError(f"{MANIFEST} of {uri}: the entry of {name!r} has no sha256 and size")
    return manifest


def _check_file(folder: Path, name: str, entry: dict) -> str | None:
    """Why ``name`` fails its manifest entry, or None if it matches."""
    return file_problem(folder, name, entry["sha256"], entry["size"])


def _fetch_s3(uri: str, cache_dir: Path | None) -> Path:
    """Download the artifact at an S3 prefix into the cache; skip files already verified."""
    _, prefix = storage.filesystem_for(uri)
    if cache_dir is None:
        root = os.environ.get("ADCORE_CACHE", Path.home() / ".cache" / "adcore")
        cache_dir = Path(root) / "artifacts"
    folder = Path(cache_dir) / prefix
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise ArtifactError(f"{uri} has no {MANIFEST}: not an artifact, or its write did not finish")
    data = storage.read_bytes(manifest_uri)
    manifest = _parse_manifest(data, uri)  # every name checked before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(folder / MANIFEST, data)
    for name, entry in manifest["files"].items():
        if _check_file(folder, name, entry) is None:
            continue
        if not inside(folder, name):  # a symbolic link in the cache: write nowhere else
            raise ArtifactError(f"{name} of {uri}: its cached copy is a symbolic link leaving {folder}")
        try:
            storage.write_bytes(folder / name, storage.read_bytes(storage.join(uri, name)))
        except FileNotFoundError:
            raise ArtifactError(f"{name} of {uri} is missing") from None
    return folder


def load_artifact(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Artifact:
    """Load and verify an artifact from a local directory or an S3 prefix.

    S3 artifacts are downloaded to ``cache_dir`` (default ``~/.cache/adcore/artifacts``,
    or ``$ADCORE_CACHE/artifacts``) first. Every file in the manifest must be a plain
    relative path (checked before anything is downloaded), inside the folder (no symbolic
    link out of it) and match its sha256 and size.

    Raises:
        ArtifactError: no manifest, unknown format, a name leaving the artifact, or a file
            missing or altered.
    """
    uri = str(uri)
    if storage.is_s3(uri):
        folder = _fetch_s3(uri, Path(cache_dir) if cache_dir else None)
    else:
        folder = Path(storage.local_path(uri))
        if not folder.is_dir():
            raise ArtifactError(f"no artifact directory at {uri}")
    manifest = _read_manifest(folder, uri)
    for name in (CONFIG, WEIGHTS, ARRAYS):
        if name not in manifest["files"]:
            raise ArtifactError(f"manifest of {uri} does not list {name}")
    for name, entry in manifest["files"].items():
        problem = _check_file(folder, name, entry)
        if problem:
            raise ArtifactError(f"{name} of {uri}: {problem}")
    return Artifact(
        path=folder,
        config=json.loads((folder / CONFIG).read_text()),
        state_dict=safetensors.torch.load_file(str(folder / WEIGHTS), device="cpu"),
        arrays=safetensors.numpy.load_file(str(folder / ARRAYS)),
        manifest=manifest,
    )
