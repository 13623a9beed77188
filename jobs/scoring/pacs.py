"""DICOMweb STOW-RS: the scoring job's DICOM objects stored in a PACS as they are written.

:class:`StowSender` posts one object per request to ``<pacs-url>/studies`` (``multipart/related;
type="application/dicom"``). Server errors (5xx, 408, 429), timeouts and refused connections are
retried with exponential backoff; other answers are final. Credentials, retries and the HTTP
failures are those of ``jobs/scoring/dicomweb.py``. Nothing logged names a credential, an
object's content or the URL's query.

Objects a run could not send are listed in ``<dicom-output>/_pacs_pending/<run_id>.json`` by the
driver after the run; the next run sends them first (:func:`retry_pending`).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

from adcore import storage
from jobs.scoring import dicomweb

log = logging.getLogger("jobs.score")

TOKEN_ENV, USER_ENV, PASSWORD_ENV = dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV
PENDING_DIR = "_pacs_pending"  # under --dicom-output: per run, the objects it could not send
FAILED_SOP_SEQUENCE = "00081198"  # STOW-RS response: the instances the PACS refused


class PacsError(dicomweb.DicomWebError):
    """An object the PACS did not store (after the retries, where retrying made sense).

    ``unavailable``: the PACS did not answer or answered with a server error to the last try (it
    is down: sending more now is futile), rather than refusing this object.
    """


def check_url(url: str) -> str:
    """``url`` without a trailing slash; refused with one line when it is not http(s) or holds credentials."""
    return dicomweb.check_http_url(url, "--pacs-url")


@dataclass
class StowSender(dicomweb.EnvCredentials):
    """Stores DICOM objects with STOW-RS; build it where it sends (it reads the credentials then)."""

    url: str  # the DICOMweb root (``check_url``)
    timeout_s: float = 30.0
    attempts: int = 6  # first try + retries: 0.5 + 1 + 2 + 4 + 8 s of backoff, about 15 s of outage ridden out
    backoff_s: float = 0.5  # first wait, doubled each retry

    def send(self, data: bytes) -> None:
        """Stores one DICOM file; raises :class:`PacsError` when it was not stored."""
        boundary = uuid.uuid4().hex
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        headers = {
            **self._headers,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        dicomweb.with_retries(
            lambda: (None, *self._post(body, headers)), self.attempts, self.backoff_s, "PACS store", PacsError
        )

    def _post(self, body: bytes, headers: dict) -> tuple[bool, str | None]:
        """One request: (worth retrying, why it failed), ``(False, None)`` when stored."""
        req = urllib.request.Request(f"{self.url}/studies", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                answer = resp.read()
        except (urllib.error.HTTPError, TimeoutError, ConnectionError, urllib.error.URLError, OSError) as e:
            return dicomweb.failure(e)
        try:  # a 200 may still list refused instances (an empty sequence: none)
            failed = (json.loads(answer).get(FAILED_SOP_SEQUENCE) or {}).get("Value") if answer.strip() else None
        except (ValueError, AttributeError):
            failed = None
        return (False, "refused by the PACS") if failed else (False, None)


def pending_path(dicom_output: str, run_id: str) -> str:
    return storage.join(dicom_output, PENDING_DIR, f"{run_id}.json")


def record_pending(dicom_output: str, run_id: str, files: list[str]) -> None:
    """Lists the run's unsent objects (paths under its folder) for the next run."""
    if files:
        storage.write_bytes(pending_path(dicom_output, run_id), json.dumps({"files": sorted(files)}).encode())


def retry_pending(dicom_output: str, sender: StowSender) -> dict[str, int]:
    """Sends the objects earlier runs could not; what is sent leaves the lists. Returns the counts.

    Once the PACS is unavailable (after the retries), the rest stay listed untried: a PACS down for
    days must not hold the night's run for an hour per thousand objects.
    """
    counts = {"sent": 0, "failed": 0}
    down = False
    try:
        lists = storage.list_files(storage.join(dicom_output, PENDING_DIR), suffixes=[".json"])
    except FileNotFoundError:
        lists = []
    for uri in lists:
        run_id = uri.rsplit("/", 1)[-1][: -len(".json")]
        try:
            files = json.loads(storage.read_bytes(uri))["files"]
        except (FileNotFoundError, ValueError, KeyError):
            continue
        left = []
        for name in files:
            if down:
                left.append(name)
                continue
            try:
                sender.send(storage.read_bytes(storage.join(dicom_output, run_id, name)))
                counts["sent"] += 1
            except FileNotFoundError:
                continue  # its run folder is gone: nothing left to send
            except PacsError as e:
                left.append(name)
                down = e.unavailable
        counts["failed"] += len(left)
        if left:
            storage.write_bytes(uri, json.dumps({"files": left}).encode())
        else:
            storage.delete(uri)
    if counts["sent"] or counts["failed"]:
        log.info("PACS: %d object(s) of earlier runs sent, %d still pending", counts["sent"], counts["failed"])
    return counts
