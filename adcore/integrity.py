"""Files from shared storage checked before use: names that stay inside their folder, sha256 digests.

Artifacts (:mod:`adcore.artifact`), the exported graphs of each artifact (:mod:`adcore.engine`)
and Triton model repositories (:mod:`adcore.serving.repository`) list their files in a manifest
with a sha256 and a size; whoever loads them checks both, and every name first.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# Read files in chunks when hashing, so large weights never sit twice in memory.
_HASH_CHUNK = 1 << 20
# A Windows drive ("C:") at the start of a name: absolute on some systems.
_DRIVE = re.compile(r"^[A-Za-z]:")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain relative path inside a folder (``a/b.bin``), or None if it is.

    Names come from manifests on shared storage: absolute paths, ``..``, backslashes, drive
    letters, empty or ``.`` parts and control characters are refused, so no name reaches
    outside the folder it is joined to.
    """
    if not isinstance(name, str) or not name:
        return "is empty or not a string"
    if "\\" in name or _DRIVE.match(name):
        return "has a backslash or a drive letter"
    if name.startswith("/"):
        return "is an absolute path"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "has a control character"
    parts = name.split("/")
    if ".." in parts:
        return "has a '..' part"
    if any(p in ("", ".") for p in parts):
        return "has an empty or '.' part"
    return None


def inside(folder: str | os.PathLike, name: str) -> bool:
    """True if ``folder / name``, symbolic links followed, stays inside ``folder``."""
    root = Path(os.path.realpath(folder))
    return Path(os.path.realpath(Path(folder) / name)).is_relative_to(root)


def file_problem(folder: Path, name: str, sha256: str, size: int) -> str | None:
    """Why ``folder / name`` is not the file a manifest lists (``sha256``, ``size``), or None if it is."""
    path = Path(folder) / name
    if not inside(folder, name):
        return "a symbolic link leaving its folder"
    if not path.is_file():
        return "missing"
    if path.stat().st_size != size:
        return f"size {path.stat().st_size} != {size} in the manifest"
    if sha256_file(path) != sha256:
        return "sha256 differs from the manifest"
    return None
