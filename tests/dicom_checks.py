"""The standard DICOM validator for tests: ``dciodvfy`` (Debian ``dicom3tools``, installed by ``make setup``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(data: bytes, tmp: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for one object (warnings are allowed)."""
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is missing: `make setup` installs Debian's dicom3tools (apt-get install -y dicom3tools)")
    path = tmp / "check.dcm"
    path.write_bytes(data)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    if done.returncode != 0 and not errors:
        errors = [f"dciodvfy exited {done.returncode}"]
    return errors
