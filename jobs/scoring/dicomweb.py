"""DICOMweb over HTTP: credentials, retries and bounded reads shared by STOW-RS, QIDO-RS and WADO-RS.

Credentials come from the environment of the process that makes the request (a Ray worker reads
them there: they are never in a pickled task): ``ADCORE_PACS_TOKEN`` (a bearer token) or
``ADCORE_PACS_USER`` + ``ADCORE_PACS_PASSWORD`` (basic). Server errors (5xx, 408, 429), timeouts
and refused connections are retried with exponential backoff; other answers are final. Nothing
logged names a credential, a URL's path (it holds DICOM UIDs) or its query.

An archive in a PACS is named ``dicomweb+http://host:port/dicom-web`` (or ``dicomweb+https://``):
the DICOMweb root with a scheme no file path or S3 URI has. Each instance listed under it is
``<root>/studies/<study>/series/<series>/instances/<sop>`` with the same scheme.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("jobs.score")

TOKEN_ENV = "ADCORE_PACS_TOKEN"
USER_ENV, PASSWORD_ENV = "ADCORE_PACS_USER", "ADCORE_PACS_PASSWORD"
RETRY_STATUSES = (408, 429)  # besides 5xx: a request timeout and throttling are worth another try
SCHEME_PREFIX = "dicomweb+"  # dicomweb+http://, dicomweb+https://: an --input read from a PACS
READ_CHUNK = 2**20  # bytes per read of a WADO-RS body (the cap is checked between reads)
MULTIPART_SLACK = 64 * 2**10  # multipart boundaries and part headers around the instance, at most
T = TypeVar("T")


class DicomWebError(Exception):
    """A request that did not succeed (after the retries, where retrying made sense).

    ``unavailable``: the server did not answer or answered with a server error to the last try (it
    is down: more requests now are futile), rather than refusing this one.
    """

    def __init__(self, why: str, unavailable: bool):
        super().__init__(why)
        self.unavailable = unavailable


class TooLarge(Exception):
    """A WADO-RS answer larger than the bound (announced by Content-Length, or found while reading)."""


def auth_header() -> dict[str, str]:
    """The Authorization header from this process's environment (empty: none)."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if user:
        raw = f"{user}:{password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    return {}


def check_http_url(url: str, flag: str) -> str:
    """``url`` without a trailing slash; refused with one line when it is not http(s) or holds credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"{flag} must be an http(s) DICOMweb root, e.g. http://pacs:8042/dicom-web (got {url!r})")
    if parts.username or parts.password:
        raise SystemExit(f"{flag} must not hold credentials: set {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV} instead")
    return url.rstrip("/")


def is_dicomweb(uri: str) -> bool:
    return str(uri).startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))


def http_url(uri: str) -> str:
    """The http(s) URL of a ``dicomweb+http(s)://`` URI."""
    return uri[len(SCHEME_PREFIX) :] if is_dicomweb(uri) else uri


def with_retries(
    attempt: Callable[[], tuple[T | None, bool, str | None]],
    attempts: int,
    backoff_s: float,
    what: str,
    error: type[DicomWebError] = DicomWebError,
) -> T | None:
    """``attempt()`` -> (value, worth retrying, why it failed or None) until it succeeds or is final.

    Waits ``backoff_s`` before the first retry, doubled each time; raises ``error`` when it failed.
    """
    wait = backoff_s
    for n in range(1, attempts + 1):
        value, retry, why = attempt()
        if why is None:
            return value
        if not retry or n == attempts:
            raise error(why, unavailable=retry)
        log.info("%s failed (%s), retry %d/%d in %.1f s", what, why, n, attempts - 1, wait)
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def failure(e: BaseException) -> tuple[bool, str]:
    """(worth retrying, why) of a failed request, without its URL."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in RETRY_STATUSES, f"HTTP {e.code}"
    reason = getattr(e, "reason", e)
    return True, type(reason).__name__


class EnvCredentials:
    """Holds the environment's Authorization header, read where the object is built or unpickled.

    A dataclass that inherits it calls ``auth_header()`` in ``__post_init__``; its pickle never
    carries the header, so a Ray task or actor made from it reads its own node's environment.
    """

    def __post_init__(self):
        self._headers = auth_header()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_headers", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._headers = auth_header()


@dataclass
class Client(EnvCredentials):
    """GETs on a DICOMweb root with the environment's credentials; build it where it requests."""

    root: str  # the http(s) DICOMweb root, no trailing slash
    timeout_s: float = 30.0
    attempts: int = 6  # first try + retries: 0.5 + 1 + 2 + 4 + 8 s of backoff, about 15 s of outage ridden out
    backoff_s: float = 0.5  # first wait, doubled each retry

    def get(self, path: str, accept: str, what: str, limit: int | None = None) -> tuple[bytes, str]:
        """(body, content type) of ``GET <root><path>``, retried; over ``limit`` bytes: :class:`TooLarge`."""

        def attempt():
            req = urllib.request.Request(self.root + path, headers={**self._headers, "Accept": accept})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return (_bounded(resp, limit), resp.headers.get("Content-Type", "")), False, None
            except TooLarge:
                raise
            except (urllib.error.HTTPError, TimeoutError, ConnectionError, urllib.error.URLError, OSError) as e:
                retry, why = failure(e)
                return None, retry, why

        return with_retries(attempt, self.attempts, self.backoff_s, what)


def _bounded(resp, limit: int | None) -> bytes:
    """The body, refused before reading when its Content-Length exceeds ``limit``, and never read past it."""
    if limit is None:
        return resp.read()
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"announced {int(length)} bytes")
    parts, got = [], 0
    while True:
        chunk = resp.read(min(READ_CHUNK, limit + 1 - got))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        got += len(chunk)
        if got > limit:
            raise TooLarge(f"more than {limit} bytes")
