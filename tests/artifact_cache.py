"""Tiny artifacts built once per test run, whichever worker process asks first.

The suite runs in several pytest-xdist processes; each used to build (and export to ONNX) its
own copy of the same seeded tiny artifact. Here the first process to ask builds it under an
exclusive file lock into a private folder, moved into place whole (a rename), and the others wait
on the lock and use it. The folder's name holds a digest of the code that makes an artifact, so an
edit of ``adcore/`` never meets an artifact built before it.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

ADCORE = Path(__file__).resolve().parents[1] / "adcore"


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over every source file of ``adcore/`` (names and contents), 16 hex digits."""
    h = hashlib.sha256()
    for path in sorted(ADCORE.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(ADCORE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def shared_tiny_artifact(root: Path, preset: str, version: int) -> str:
    """Path of the run's tiny ``preset`` artifact of ``version`` under ``root``, built if missing."""
    from adcore.testing import tiny_artifact

    folder = Path(root) / "tiny-artifacts" / code_digest()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{preset}-v{version}" / f"{preset}-tiny"
    with open(folder / f"{preset}-v{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not final.exists():
            work = Path(tempfile.mkdtemp(dir=folder, prefix=f".{preset}-v{version}-"))
            try:
                tiny_artifact(work / final.name, preset, version=version)
                final.parent.mkdir()
                (work / final.name).rename(final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return str(final)
