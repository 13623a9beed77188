"""The scoring job's DICOM objects stored in a PACS as they are written: DICOMweb STOW-RS or DICOM C-STORE.

Both senders have one method, ``send(data)``: it stores one DICOM file or raises :class:`PacsError`
(``unavailable`` when the PACS did not answer, after the retries). The writer and the driver use
whichever :func:`make_sender` built, never knowing which.

:class:`StowSender` posts one object per request to ``<pacs-url>/studies`` (``multipart/related;
type="application/dicom"``). Server errors (5xx, 408, 429), timeouts and refused connections are
retried with exponential backoff; other answers are final. Credentials, retries and the HTTP
failures are those of ``jobs/scoring/dicomweb.py``. Nothing logged names a credential, an
object's content or the URL's query.


:class:`CStoreSender` opens one DICOM association per object (``--pacs-calling-aet`` to
``--pacs-aet`` at ``--pacs-host:--pacs-port``) with one presentation context: the object's SOP
class (Segmentation Storage, Comprehensive 3D SR Storage, ...) in the transfer syntax its file
has. A refused or dropped association, a timeout and the statuses that say "out of resources"
are retried with the same backoff; other failure statuses are final. An association per object
costs a handshake, and never leaves one open in a Ray worker between tasks.

Objects a run could not send are named in its write tasks' object lists (``unsent``); the driver
records which lists hold some in ``<dicom-output>/_pacs_pending/<run_id>.json`` after the run, and
the next run sends them first (:func:`retry_pending`).
"""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Protocol

from adcore import storage
from jobs.scoring import dicomweb

log = logging.getLogger("jobs.score")

TOKEN_ENV, USER_ENV, PASSWORD_ENV = dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV
PENDING_DIR = "_pacs_pending"  # under --dicom-output: per run, the objects it could not send
FAILED_SOP_SEQUENCE = "00081198"  # STOW-RS response: the instances the PACS refused
DEFAULT_CALLING_AET = "ADCORE"  # --pacs-calling-aet: the AE title adcore's associations present
AET_MAX = 16  # characters in an AE title (DICOM PS3.5, VR AE)
# C-STORE failure statuses worth another try: 0xA7xx "Refused: Out of Resources" and 0x0213
# "Resource Limitation" (a full disk or a busy server); the others refuse the object itself.
CSTORE_TRANSIENT = (range(0xA700, 0xA800), range(0x0213, 0x0214))
CSTORE_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)  # stored, with coercion or elements discarded


class PacsError(dicomweb.DicomWebError):
    """An object the PACS did not store (after the retries, where retrying made sense).

    ``unavailable``: the PACS did not answer or answered with a server error to the last try (it
    is down: sending more now is futile), rather than refusing this object.
    """


class Sender(Protocol):
    """Stores one DICOM file in the PACS; raises :class:`PacsError` when it was not stored."""

    def send(self, data: bytes) -> None: ...


def check_url(url: str) -> str:
    """``url`` without a trailing slash; refused with one line when it is not http(s) or holds credentials."""
    return dicomweb.check_http_url(url, "--pacs-url")


def check_aet(aet: str, flag: str) -> str:
    """``aet`` stripped; refused with one line unless it is a valid AE title (1-16 printable characters, no \\)."""
    title = aet.strip()
    if not title or len(title) > AET_MAX or "\\" in title or not title.isascii() or not title.isprintable():
        raise SystemExit(f"{flag} must be an AE title of 1 to {AET_MAX} printable ASCII characters without \\")
    return title


def make_sender(
    url: str = "",
    aet: str = "",
    host: str = "",
    port: int = 0,
    calling_aet: str = DEFAULT_CALLING_AET,
    attempts: int = 6,
) -> StowSender | CStoreSender | None:
    """The sender for ``--pacs-url`` or ``--pacs-aet``/``--pacs-host``/``--pacs-port`` (None: neither).

    Refused with one line when both are given, when the trio is incomplete, or a value is invalid.
    """
    trio = {"--pacs-aet": aet, "--pacs-host": host, "--pacs-port": port}
    given = [flag for flag, v in trio.items() if v]
    if url and given:
        raise SystemExit("give --pacs-url (DICOMweb) or --pacs-aet/--pacs-host/--pacs-port (C-STORE), not both")
    if url:
        return StowSender(check_url(url), attempts=attempts)
    if not given:
        return None
    if len(given) < len(trio):
        missing = ", ".join(flag for flag in trio if flag not in given)
        raise SystemExit(f"C-STORE needs --pacs-aet, --pacs-host and --pacs-port together (missing {missing})")
    if not 0 < int(port) < 65536:
        raise SystemExit(f"--pacs-port must be a TCP port, 1 to 65535 (got {port})")
    return CStoreSender(
        check_aet(aet, "--pacs-aet"),
        host.strip(),
        int(port),
        check_aet(calling_aet, "--pacs-calling-aet"),
        attempts=attempts,
    )


def describe(sender: Sender) -> dict[str, str]:
    """The manifest's name of the PACS (no credential: a URL holding one is refused by check_url)."""
    if isinstance(sender, CStoreSender):
        return {"pacs_dicom": f"{sender.aet}@{sender.host}:{sender.port}"}
    return {"pacs_url": sender.url}


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


@dataclass
class CStoreSender:
    """Stores DICOM objects with C-STORE, one association per object (no credentials: DICOM has none)."""

    aet: str  # the PACS's (called) AE title
    host: str
    port: int
    calling_aet: str = DEFAULT_CALLING_AET  # the PACS must know or accept it
    timeout_s: float = 30.0  # association, DIMSE and network timeouts
    attempts: int = 6  # first try + retries: 0.5 + 1 + 2 + 4 + 8 s of backoff, about 15 s of outage ridden out
    backoff_s: float = 0.5  # first wait, doubled each retry

    def send(self, data: bytes) -> None:
        """Stores one DICOM file; raises :class:`PacsError` when it was not stored."""
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            context = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        except Exception as e:  # noqa: BLE001 (our own objects: unreadable is a bug, but never a crash here)
            raise PacsError(f"not a DICOM file ({type(e).__name__})", unavailable=False) from None
        dicomweb.with_retries(
            lambda: (None, *self._store(ds, context)), self.attempts, self.backoff_s, "PACS store", PacsError
        )

    def _store(self, ds, context: tuple[str, str]) -> tuple[bool, str | None]:
        """One association: (worth retrying, why it failed), ``(False, None)`` when stored."""
        from pynetdicom import AE

        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its lines quote datasets; ours say why
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        ae.add_requested_context(*context)
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            answer = assoc.acceptor.primitive  # the A-ASSOCIATE response, None when the PACS gave none
            if assoc.is_rejected:  # result 1: rejected for good (an unknown AE title), 2: for now
                return answer.result != 1, f"association rejected ({answer.reason_str})"
            if answer is not None and answer.result == 0:  # accepted, but not this object's context
                return False, "the PACS accepts neither this SOP class nor its transfer syntax"
            return True, "no association"
        try:
            status = assoc.send_c_store(ds)
        except (OSError, RuntimeError) as e:  # the association dropped
            return True, type(e).__name__
        except (ValueError, AttributeError) as e:  # the object does not fit the context pynetdicom agreed
            return False, type(e).__name__
        finally:
            assoc.release()
        code = int(getattr(status, "Status", -1)) if status is not None else -1
        if code == 0 or code in CSTORE_WARNINGS:
            return False, None
        if code == -1:  # no answer: a DIMSE timeout or an aborted association
            return True, "no C-STORE response"
        return any(code in r for r in CSTORE_TRANSIENT), f"C-STORE status 0x{code:04X}"


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


def retry_pending(dicom_output: str, sender: Sender) -> dict[str, int]:
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
