"""Local paths and ``s3://bucket/prefix`` URIs through ``pyarrow.fs``.

The S3 endpoint comes from ``AWS_ENDPOINT_URL`` (an ``http://`` one selects plain HTTP: a
local test server) and ``AWS_REGION``/``AWS_DEFAULT_REGION``; the credentials from the AWS
SDK's standard chain on each node (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``~/.aws``, an instance or pod role), never passed in explicitly, so
the same URI works in a notebook, a Ray worker and Ray Data (pass ``s3_filesystem()`` as its
``filesystem``), and no filesystem object that is pickled into a task carries a key.
Nothing here logs or formats credentials into messages.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs

from adcore import s3retry
from adcore.errors import DataNotFoundError, StorageURIError

S3_PREFIX = "s3://"
# What a mistyped S3 URI starts with ("s3:/b", "S3://b", "s3:b", "s3a://b"): refused, never a local folder of that name.
_MISTYPED_S3 = re.compile(r"^s3[an]?:", re.IGNORECASE)
_FILE_PREFIX = "file://"
READ_PIECE = 2**20  # bytes read (and hashed) at a time when a digest is computed while reading
# Attempts per S3 request (throttling, 5xx answers, dropped connections) before it fails.
S3_MAX_ATTEMPTS = 10


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith(S3_PREFIX)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def s3_filesystem() -> pafs.S3FileSystem:
    """This process's native S3 filesystem for the endpoint and region of the AWS environment.

    No key is given to it: the AWS SDK's default credential chain finds them (environment
    variables, ``~/.aws``, an instance or pod role) when a request is signed, on whichever node
    the filesystem is used. So every node needs the chain: Ray workers of a local cluster
    inherit the environment of the process that called ``ray.init``; on a multi-node cluster
    give each node the variables or a role (the jobs never forward credentials themselves).
    For libraries that need the native class (Ray Train's storage); everything else goes
    through :func:`filesystem_for`, whose operations outlast throttling (:mod:`adcore.s3retry`).
    """
    endpoint, scheme, region = _s3_settings()
    return _s3_filesystem(endpoint, scheme, region, os.getpid())


def _s3_settings() -> tuple[str | None, str | None, str | None]:
    """(endpoint host, scheme, region) from the AWS environment."""
    endpoint, scheme = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), None
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        if not sep:
            scheme, host = "https", endpoint
        if scheme not in ("http", "https"):
            raise StorageURIError(f"AWS_ENDPOINT_URL must start with http:// or https://, not {scheme}://")
        endpoint = host.rstrip("/")
    return endpoint, scheme, _env("AWS_REGION", "AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=4)
def _s3_filesystem(endpoint: str | None, scheme: str | None, region: str | None, pid: int) -> pafs.S3FileSystem:
    """``pid``: a forked child makes its own (the SDK's connections are not shared across a fork)."""
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
    if endpoint:
        kwargs.update(endpoint_override=endpoint, scheme=scheme)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def retrying_s3_filesystem() -> pafs.FileSystem:
    """This process's S3 filesystem whose every operation is retried through throttling (one per process)."""
    return _retrying(*_s3_settings(), os.getpid())


@functools.lru_cache(maxsize=4)
def _retrying(endpoint: str | None, scheme: str | None, region: str | None, pid: int) -> pafs.FileSystem:
    return s3retry.filesystem(endpoint, scheme, region)


def local_path(uri: str | os.PathLike) -> str:
    """Absolute local path of a path or ``file://`` URI (``~`` expanded)."""
    text = str(uri)
    if is_s3(text):
        raise StorageURIError(f"expected a local path, got an S3 URI: {text}")
    if _MISTYPED_S3.match(text):
        raise StorageURIError(f"{text!r} is not an S3 URI: write s3://bucket/prefix (lower-case s3, two slashes)")
    if text.startswith(_FILE_PREFIX):
        text = text[len(_FILE_PREFIX) :]
    return os.path.abspath(os.path.expanduser(text))


def absolute(uri: str | os.PathLike) -> str:
    """``uri`` made independent of the working directory: S3 URIs as they are, local paths absolute.

    Ray workers do not run in the driver's directory, so jobs pass absolute paths on.
    """
    return str(uri) if is_s3(str(uri)) else local_path(uri)


def filesystem_for(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (``bucket/key`` or an absolute path)."""
    text = str(uri)
    if is_s3(text):
        path = text[len(S3_PREFIX) :].strip("/")
        if not path:
            raise StorageURIError(f"S3 URI has no bucket: {text!r} (expected s3://bucket/prefix)")
        return retrying_s3_filesystem(), path
    return pafs.LocalFileSystem(), local_path(text)


def _to_uri(uri: str, path: str) -> str:
    return S3_PREFIX + path if is_s3(uri) else path


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI (``/`` separators on S3)."""
    text = str(uri)
    if is_s3(text):
        base = text.rstrip("/")
        rest = [p.strip("/") for p in parts if p and p.strip("/")]
        return posixpath.join(base, *rest) if rest else base
    return os.path.join(text, *parts)


def list_files(uri: str | os.PathLike, suffixes: Iterable[str] | None = None, recursive: bool = True) -> list[str]:
    """Sorted files under ``uri`` as full URIs (``s3://`` kept), optionally by suffix.

    Suffixes compare case-insensitively (``".png"`` matches ``X.PNG``). A URI naming a
    single file lists that file.

    Raises:
        FileNotFoundError: if nothing exists at ``uri``.
    """
    text = str(uri)
    fs, path = filesystem_for(text)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
        except FileNotFoundError:
            raise DataNotFoundError(f"no such directory or prefix: {text}") from None
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out = [
        _to_uri(text, i.path)
        for i in infos
        if i.type == pafs.FileType.File and (wanted is None or i.path.lower().endswith(wanted))
    ]
    return sorted(out)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataNotFoundError(f"no such file: {uri}") from None


class Reader:
    """Reads whole files (local or S3) with one filesystem per kind, made on first use.

    For a task that reads many files: :func:`read_bytes` makes a filesystem (an S3 client) per
    call. The filesystems are not pickled: a reader shipped to a Ray task makes its own.
    """

    def __init__(self):
        self._fs: dict[bool, pafs.FileSystem] = {}

    def __getstate__(self) -> dict:
        return {"_fs": {}}

    def read(self, uri: str | os.PathLike) -> bytes:
        s3 = is_s3(uri)
        fs = self._fs.get(s3)
        if fs is None:
            fs = self._fs[s3] = retrying_s3_filesystem() if s3 else pafs.LocalFileSystem()
        path = str(uri)[len(S3_PREFIX) :] if s3 else local_path(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_listed(self, uri: str, size: int, root: str, digest=None) -> bytes:
        """One listed input file, read no further than its listed ``size`` (see :func:`read_local_listed`).

        ``root`` is the listed folder or prefix: local files must be regular files inside it.
        ``digest`` (a ``hashlib`` object) is updated with each piece as it is read: no second pass.
        Safe to call from several threads at once (one filesystem per kind, thread-safe).
        """
        if not is_s3(uri):
            return read_local_listed(local_path(uri), size, local_path(root), digest)
        fs = self._fs.get(True)
        if fs is None:
            fs = self._fs.setdefault(True, retrying_s3_filesystem())
        with fs.open_input_stream(str(uri)[len(S3_PREFIX) :]) as f:
            return _at_most(f, size, digest)


class NotAFile(OSError):
    """A listed input that is not a regular file inside the input folder: nothing is read from it.

    The message says why, without the path (the caller has it).
    """


class ChangedSinceListing(OSError):
    """A file whose size is no longer the listed one: read at most the listed size, then refused."""


def check_regular_file(path: str, root: str) -> str:
    """The real path of local ``path`` if it is a regular file inside folder (or file) ``root``.

    Links are followed when they end inside ``root``; the target is stat'ed, never opened, so a
    FIFO, socket or device is refused without touching it.

    Raises:
        NotAFile: a FIFO, socket, device, folder, broken link, or a link leading outside ``root``.
        FileNotFoundError: nothing is at ``path`` any more.
    """
    real, top = os.path.realpath(path), os.path.realpath(root)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        raise NotAFile("a link leading outside the input")
    try:
        st = os.stat(real)
    except OSError:
        if os.path.islink(path):  # broken or looping
            raise NotAFile("a link that leads to no file") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(f"not a regular file ({_file_type(st.st_mode)})")
    return real


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"


def read_local_listed(path: str, size: int, root: str, digest=None) -> bytes:
    """A local input file's bytes, refused unless regular and inside ``root``, never read past ``size``.

    ``size`` is the listed one: a file that grew or shrank since is refused after reading at most
    ``size + 1`` bytes (the next listing sees its new size).

    Raises:
        NotAFile: see :func:`check_regular_file`.
        ChangedSinceListing: the file's size differs from ``size``.
    """
    real = check_regular_file(path, root)
    # Non-blocking and no link followed: a file swapped for a FIFO or link since the check is refused too.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"not a regular file ({_file_type(st.st_mode)})")
        if st.st_size != size:  # before reading: a read allocates what it may return
            raise ChangedSinceListing(f"changed since it was listed: {st.st_size} bytes, listed {size}")
        return _at_most(f, size, digest)


def _at_most(f, size: int, digest=None) -> bytes:
    """``size`` bytes of ``f`` (refused if it holds more or fewer), fed to ``digest`` piece by piece."""
    if digest is None:
        data = f.read(size + 1)
    else:  # each piece hashed as it arrives, while it is still in the CPU's cache
        pieces, got = [], 0
        while got <= size and (piece := f.read(min(READ_PIECE, size + 1 - got))):
            digest.update(piece)
            pieces.append(piece)
            got += len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if len(data) != size:
        found = "more bytes" if len(data) > size else f"{len(data)} bytes"
        raise ChangedSinceListing(f"changed since it was listed: {found}, listed {size}")
    return data


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a file, creating parent folders.

    Local writes go to a temporary file in the same folder, then rename over the
    target, so readers never see a partial file. An S3 PUT is atomic by itself.
    """
    if is_s3(uri):
        fs, path = filesystem_for(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(local_path(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str | os.PathLike) -> bool:
    """True if a file or directory (on S3: an object or a non-empty prefix) is at ``uri``."""
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    """Create a local directory with its parents; a no-op on S3, which has no directories."""
    if not is_s3(uri):
        os.makedirs(local_path(uri), exist_ok=True)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (local or S3), keeping relative paths."""
    src = local_path(local_dir)
    if not os.path.isdir(src):
        raise DataNotFoundError(f"no such local directory: {local_dir}")
    dst_fs, dst = filesystem_for(uri)
    makedirs(uri)
    local = pafs.LocalFileSystem()
    pafs.copy_files(src, dst, source_filesystem=local, destination_filesystem=dst_fs)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy every file under ``uri`` (local or S3) into ``local_dir``, keeping relative paths."""
    src_fs, src = filesystem_for(uri)
    if src_fs.get_file_info(src).type == pafs.FileType.NotFound:
        raise DataNotFoundError(f"no such directory or prefix: {uri}")
    dst = local_path(local_dir)
    os.makedirs(dst, exist_ok=True)
    local = pafs.LocalFileSystem()
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=local)


# ----------------------------------------------------------------------------- listings and leases
# Columns of a listing: what change detection compares without reading an object.
LIST_PAGE = 1000  # S3's page size; local listings are batched the same way


# Attempts of a listing or lease call: S3 answers 503 SlowDown under load; adaptive mode also
# slows this client's own request rate while it is throttled.
S3_CLIENT_RETRIES = {"mode": "adaptive", "max_attempts": 10}


def s3_client():
    """A boto3 S3 client from the same AWS_* variables as :func:`s3_filesystem`."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        region_name=_env("AWS_REGION", "AWS_DEFAULT_REGION"),
        config=Config(retries=S3_CLIENT_RETRIES),
    )


def _bucket_key(uri: str) -> tuple[str, str]:
    path = str(uri)[len(S3_PREFIX) :]
    bucket, _, key = path.partition("/")
    if not bucket:
        raise StorageURIError(f"S3 URI has no bucket: {uri!r} (expected s3://bucket/prefix)")
    return bucket, key


def list_objects(uri: str | os.PathLike, skip_hidden: bool = True):
    """Every file under ``uri`` with what identifies its version, as a ``pyarrow.Table``.

    Columns ``uri`` (full URI), ``size`` (bytes) and ``version``: the ETag on S3, the
    modification time in nanoseconds locally. Built page by page (1,000 entries at a time,
    S3's own pagination), so no Python object per entry outlives its page. Hidden files
    (a name starting with ".") are left out when ``skip_hidden``. Sorted by ``uri``.

    Raises:
        FileNotFoundError: if nothing exists at ``uri``.
    """
    import pyarrow as pa

    text = str(uri)
    batches: list[pa.RecordBatch] = []
    page: tuple[list, list, list] = ([], [], [])

    def add(u: str, size: int, version: str) -> None:
        if skip_hidden and posixpath.basename(u).startswith("."):
            return
        for col, v in zip(page, (u, size, version)):
            col.append(v)
        if len(page[0]) >= LIST_PAGE:
            flush()

    def flush() -> None:
        if page[0]:
            batches.append(
                pa.record_batch(
                    [pa.array(page[0], pa.string()), pa.array(page[1], pa.int64()), pa.array(page[2], pa.string())],
                    schema=_listing_schema(),
                )
            )
            for col in page:
                col.clear()

    if is_s3(text):
        bucket, prefix = _bucket_key(text.rstrip("/"))
        client = s3_client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for resp in pages:
            for obj in resp.get("Contents", ()):
                key = obj["Key"]
                if prefix and key != prefix and not key.startswith(prefix.rstrip("/") + "/"):
                    continue  # "a/b" must not list "a/bc"
                add(f"{S3_PREFIX}{bucket}/{key}", obj["Size"], obj["ETag"].strip('"'))
    else:
        root = local_path(text)
        if os.path.isfile(root):
            st = os.stat(root)
            add(root, st.st_size, str(st.st_mtime_ns))
        elif not os.path.isdir(root):
            raise DataNotFoundError(f"no such directory or prefix: {text}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            # Links to folders are listed, not followed: each is an entry the job refuses (not a file).
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in sorted(filenames + links):
                p = os.path.join(dirpath, name)
                st = _stat_entry(p)
                add(p, st.st_size, str(st.st_mtime_ns))
    flush()
    table = pa.Table.from_batches(batches, schema=_listing_schema())
    if not table.num_rows and not (is_s3(text) or os.path.exists(local_path(text))):
        raise DataNotFoundError(f"no such directory or prefix: {text}")
    return table.sort_by("uri")


def _stat_entry(path: str) -> os.stat_result:
    """The stat of what ``path`` names (a link's target), or the link's own when it leads nowhere."""
    try:
        return os.stat(path)
    except OSError:  # a broken or looping link: listed, refused when read
        return os.lstat(path)


def _listing_schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])


def create_exclusive(uri: str | os.PathLike, data: bytes) -> bool:
    """Create a file only if none exists at ``uri``; True if this call created it.

    Atomic against concurrent callers on other machines: ``O_CREAT | O_EXCL`` locally, a
    conditional PUT (``If-None-Match: *``) on S3.
    """
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(str(uri))
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    target = Path(local_path(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def delete(uri: str | os.PathLike) -> None:
    """Delete one file (no error if it is already gone)."""
    fs, path = filesystem_for(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str | os.PathLike) -> None:
    """Delete a folder or S3 prefix and everything under it (no error if it is gone)."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
