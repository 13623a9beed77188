"""An S3 filesystem whose every operation outlasts throttling: attempts with jittered backoff, no quota.

The AWS SDK's own retries stop under sustained throttling: its standard mode spends a retry
quota per failed attempt, and a store answering ``503 SlowDown`` to a share of all requests for
hours empties it, after which each throttled request fails at once. Then a night fails on the
first unlucky request. Here each filesystem operation (a listing, a HEAD, a delete, the read of
a byte range, the upload of a whole file) is retried on a transient error with capped, jittered
exponential backoff, independently of any quota; the SDK keeps a few quick attempts of its own
underneath.

Writes are buffered (in memory, spilling to a temporary file past ``SPOOL_BYTES``) and uploaded
when the stream closes, so a failed upload is retried whole: an object is never left half
written. Reads reopen the object and resume at the failed position.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

T = TypeVar("T")

# Substrings of an error's message that a later attempt can get past: throttling, 5xx answers,
# dropped or refused connections, timeouts.
TRANSIENT_ERRORS = (
    "SLOW_DOWN", "SlowDown", "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504",
    "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
    "NETWORK_CONNECTION", "Connection reset", "Connection refused", "timed out", "Throttl",
)  # fmt: skip
ATTEMPTS = 10  # per operation; with the SDK's own attempts below, each S3 request is tried up to 30 times
SDK_ATTEMPTS = 3  # the SDK's quick attempts per request (its later backoff steps last seconds, and stop with its quota)
BACKOFF_S = 0.1  # first delay; doubles per attempt, full jitter
MAX_BACKOFF_S = 5.0
SINGLE_PUT_BYTES = 1 << 30  # uploads up to this size are one PUT; larger ones go multipart
SPOOL_BYTES = 64 << 20  # an output stream's bytes kept in memory before it spills to a temporary file
_CHUNK = 8 << 20


def is_transient(error: BaseException) -> bool:
    """True for an error a later attempt can get past (never for a missing file or a refusal)."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = str(error)
    return isinstance(error, (OSError, TimeoutError)) and any(m in text for m in TRANSIENT_ERRORS)


def retried(fn: Callable[[], T], attempts: int | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, called again after a transient error with capped, jittered exponential backoff."""
    attempts = attempts or ATTEMPTS
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by is_transient
            if attempt == attempts - 1 or not is_transient(e):
                raise
            sleep(random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt)))
    raise AssertionError("unreachable")


def filesystem(endpoint: str | None, scheme: str | None, region: str | None) -> pafs.PyFileSystem:
    """A retrying S3 filesystem; pickled as its settings only (no client, no credential)."""
    return pafs.PyFileSystem(RetryingS3(endpoint, scheme, region))


class RetryingS3(pafs.FileSystemHandler):
    """``pyarrow.fs`` handler: each call of an inner :class:`pyarrow.fs.S3FileSystem`, retried."""

    def __init__(self, endpoint: str | None, scheme: str | None, region: str | None):
        self.settings = (endpoint, scheme, region)
        kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=SDK_ATTEMPTS)}
        if endpoint:
            kwargs.update(endpoint_override=endpoint, scheme=scheme or "https")
        if region:
            kwargs["region"] = region
        self.fs = pafs.S3FileSystem(**kwargs)
        self._boto = None

    def _client(self):
        """A boto3 client for single-request uploads, made on first use, without retries of its own."""
        if self._boto is None:
            import boto3
            from botocore.config import Config

            endpoint, scheme, region = self.settings
            url = f"{scheme or 'https'}://{endpoint}" if endpoint else None
            config = Config(retries={"mode": "standard", "total_max_attempts": 1})
            self._boto = boto3.client("s3", endpoint_url=url, region_name=region, config=config)
        return self._boto

    def __reduce__(self):
        return RetryingS3, self.settings

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingS3) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash(self.settings)

    def get_type_name(self) -> str:
        return "s3-retrying"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return retried(lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return retried(lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        retried(lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        retried(lambda: _missing_ok(lambda: self.fs.delete_dir(path)))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        retried(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path):
        retried(lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        retried(lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        retried(lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return pa.PythonFile(_Reader(self.fs, path), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_Reader(self.fs, path), mode="r")

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Upload(self.fs, self._client(), path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError("S3 objects cannot be appended to")


def _missing_ok(fn: Callable[[], None]) -> None:
    """A delete retried after it succeeded unseen finds nothing: that is success."""
    try:
        fn()
    except FileNotFoundError:
        pass


class _Reader:
    """A random-access object reader that reopens the object and resumes where a read failed."""

    def __init__(self, fs: pafs.S3FileSystem, path: str):
        self._fs, self._path, self._pos, self.closed = fs, path, 0, False
        self._file = retried(lambda: fs.open_input_file(path))  # a missing object raises here, unretried
        self._size = self._file.size()

    def _read_at(self, n: int, pos: int) -> bytes:
        try:
            return self._file.read_at(n, pos)
        except Exception:
            self._file = self._fs.open_input_file(self._path)  # a fresh connection for the next attempt
            raise

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        data = retried(lambda: self._read_at(n, self._pos))
        self._pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        memoryview(buf)[: len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()


def _put(client, bucket: str, key: str, body: bytes) -> None:
    """One PutObject; its errors as ``pyarrow.fs`` raises them (OSError kinds, AWS wording)."""
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"When uploading key '{key}' in bucket '{bucket}'"
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        kind = {403: PermissionError, 404: FileNotFoundError}.get(status, OSError)
        raise kind(f"{where}: AWS Error {code} (HTTP status {status}) during PutObject operation") from None
    except BotoCoreError as e:
        raise OSError(f"{where}: AWS Error NETWORK_CONNECTION during PutObject operation: {type(e).__name__}") from None


class _Upload:
    """An output stream buffered until closed, then uploaded whole (and again whole if it fails)."""

    def __init__(self, fs: pafs.S3FileSystem, client, path: str, metadata):
        self._fs, self._client, self._path, self._metadata, self.closed = fs, client, path, metadata, False
        self._buf = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed by close()

    def write(self, data) -> int:
        return self._buf.write(data)

    def tell(self) -> int:
        return self._buf.tell()

    def flush(self) -> None:
        pass

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def _upload(self) -> None:
        size = self._buf.seek(0, 2)
        self._buf.seek(0)
        if size <= SINGLE_PUT_BYTES:  # one request to retry, not a multipart upload of three or more
            bucket, _, key = self._path.partition("/")
            _put(self._client, bucket, key, self._buf.read())
            return
        with self._fs.open_output_stream(self._path, metadata=self._metadata) as out:
            while chunk := self._buf.read(_CHUNK):
                out.write(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            retried(self._upload)
        finally:
            self._buf.close()
