"""DICOMweb STOW-RS: the scoring job's DICOM objects stored in a PACS as they are written.

:class:`StowSender` posts one object per request to ``<pacs-url>/studies`` (``multipart/related;
type="application/dicom"``). Server errors (5xx, 408, 429), timeouts and refused connections are
retried with exponential backoff; other answers are final. Credentials come from the environment
of the process that sends (a Ray worker reads them there: they are never in a pickled task):
``ADCORE_PACS_TOKEN`` (a bearer token) or ``ADCORE_PACS_USER`` + ``ADCORE_PACS_PASSWORD`` (basic).
Nothing logged names a credential, an object's content or the URL's query.

Objects a run could not send are named in its write tasks' object lists (``unsent``); the driver
records which lists hold some in ``<dicom-output>/_pacs_pending/<run_id>.json`` after the run, and
the next run sends them first (:func:`retry_pending`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

from adcore import storage

log = logging.getLogger("jobs.score")

TOKEN_ENV = "ADCORE_PACS_TOKEN"
USER_ENV, PASSWORD_ENV = "ADCORE_PACS_USER", "ADCORE_PACS_PASSWORD"
PENDING_DIR = "_pacs_pending"  # under --dicom-output: per run, the objects it could not send
RETRY_STATUSES = (408, 429)  # besides 5xx: a request timeout and throttling are worth another try
FAILED_SOP_SEQUENCE = "00081198"  # STOW-RS response: the instances the PACS refused


class PacsError(Exception):
    """An object the PACS did not store (after the retries, where retrying made sense).

    ``unavailable``: the PACS did not answer or answered with a server error to the last try (it
    is down: sending more now is futile), rather than refusing this object.
    """

    def __init__(self, why: str, unavailable: bool):
        super().__init__(why)
        self.unavailable = unavailable


def check_url(url: str) -> str:
    """``url`` without a trailing slash; refused with one line when it is not http(s) or holds credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"--pacs-url must be an http(s) DICOMweb root, e.g. http://pacs:8042/dicom-web (got {url!r})")
    if parts.username or parts.password:
        raise SystemExit(f"--pacs-url must not hold credentials: set {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV} instead")
    return url.rstrip("/")


def _auth_header() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user:
        raw = f"{user}:{password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    return {}


@dataclass
class StowSender:
    """Stores DICOM objects with STOW-RS; build it where it sends (it reads the credentials then)."""

    url: str  # the DICOMweb root (``check_url``)
    timeout_s: float = 30.0
    attempts: int = 6  # first try + retries: 0.5 + 1 + 2 + 4 + 8 s of backoff, about 15 s of outage ridden out
    backoff_s: float = 0.5  # first wait, doubled each retry

    def __post_init__(self):
        self._headers = _auth_header()

    def __getstate__(self):  # never pickled with its credentials
        state = dict(self.__dict__)
        state.pop("_headers", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._headers = _auth_header()

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
        wait = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            retry, why = self._post(body, headers)
            if why is None:
                return
            if not retry or attempt == self.attempts:
                raise PacsError(why, unavailable=retry)
            log.info("PACS store failed (%s), retry %d/%d in %.1f s", why, attempt, self.attempts - 1, wait)
            time.sleep(wait)
            wait *= 2

    def _post(self, body: bytes, headers: dict) -> tuple[bool, str | None]:
        """One request: (worth retrying, why it failed), ``(False, None)`` when stored."""
        req = urllib.request.Request(f"{self.url}/studies", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                answer = resp.read()
        except urllib.error.HTTPError as e:
            return e.code >= 500 or e.code in RETRY_STATUSES, f"HTTP {e.code}"
        except (TimeoutError, ConnectionError, urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return True, type(reason).__name__
        try:  # a 200 may still list refused instances (an empty sequence: none)
            failed = (json.loads(answer).get(FAILED_SOP_SEQUENCE) or {}).get("Value") if answer.strip() else None
        except (ValueError, AttributeError):
            failed = None
        return (False, "refused by the PACS") if failed else (False, None)


def pending_path(dicom_output: str, run_id: str) -> str:
    return storage.join(dicom_output, PENDING_DIR, f"{run_id}.json")


def record_pending(dicom_output: str, run_id: str, lists: list[str]) -> None:
    """Names the run's object lists that hold unsent objects (``dicom_out.write_object_list``), for the next run."""
    if lists:
        storage.write_bytes(pending_path(dicom_output, run_id), json.dumps({"lists": sorted(lists)}).encode())


def _pending_names(dicom_output: str, run_id: str, pending: dict) -> list[str]:
    """The object names a pending file stands for: its own ``files`` and the ``unsent`` of its ``lists``."""
    from jobs.scoring.dicom_out import read_object_lists

    names = list(pending.get("files", ()))
    if pending.get("lists"):
        try:
            names += read_object_lists(storage.join(dicom_output, run_id), pending["lists"])[1]
        except FileNotFoundError:  # its run folder is gone: nothing left to send
            pass
    return names


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
            pending = json.loads(storage.read_bytes(uri))
            if down:  # untried: the file stays as it is
                counts["failed"] += len(_pending_names(dicom_output, run_id, pending))
                continue
            files = _pending_names(dicom_output, run_id, pending)
        except (FileNotFoundError, ValueError, KeyError, TypeError):
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
