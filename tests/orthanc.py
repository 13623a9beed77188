"""A real PACS for tests: Debian's Orthanc with its DICOMweb plugin, on 127.0.0.1, stopped by its PID.

``make setup`` installs the packages (``orthanc``, ``orthanc-dicomweb``). Each :class:`Orthanc`
runs unprivileged from a JSON configuration in its own folder (storage and index there), with
HTTP and DICOM ports of its own, no remote access and no authentication. Its DICOM side answers
only to its own AE title (``AET``) and stores from any calling AE title.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AET = "ADCORE-TEST-PACS"  # its DICOM AE title: associations called otherwise are rejected
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if shutil.which("Orthanc") is None or not PLUGIN.exists():
        return "Orthanc is missing: `make setup` installs Debian's orthanc and orthanc-dicomweb"
    return None


class Orthanc:
    """``with Orthanc(folder) as pacs``: ``pacs.url`` (REST API), ``pacs.dicomweb`` (DICOMweb root),
    ``pacs.dicom_port`` (C-STORE to ``AET`` on 127.0.0.1)."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.users = users or {}  # HTTP basic authentication when set
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Orthanc:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "adcore-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,  # any calling AE title may store (none is registered)
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}: {self._log_tail()}")
            try:
                self.get("/system")
                return self
            except urllib.error.HTTPError:
                return self  # it answers (a 401 before the credentials are checked is an answer)
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"Orthanc did not answer /system in {START_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _log_tail(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")[-2000:]

    def get(self, path: str):
        """GET on the REST API, parsed JSON."""
        req = urllib.request.Request(self.url + path)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def instances_by_study(self) -> dict[str, set[str]]:
        """StudyInstanceUID -> SOPInstanceUIDs of every instance stored."""
        out: dict[str, set[str]] = {}
        for study in self.get("/studies?expand"):
            uid = study["MainDicomTags"]["StudyInstanceUID"]
            for inst in self.get(f"/studies/{study['ID']}/instances?expand"):
                out.setdefault(uid, set()).add(inst["MainDicomTags"]["SOPInstanceUID"])
        return out
