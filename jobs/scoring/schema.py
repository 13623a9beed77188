"""The scoring job's output schema (version 4), and the pure per-row helpers that fill it.

One Parquet row per scored image or frame (a NIfTI slice, a DICOM frame):

=============== ========== ==========================================================
column          type       meaning
=============== ========== ==========================================================
image_key       string     the image's identity in every table: its URI with ``--path-privacy keep``
                           (the default), HMAC-SHA256(ADCORE_STUDY_KEY_SECRET, URI) hex with
                           ``pseudonymize`` (version 4; older files: their ``image_uri``)
image_uri       string     full URI of the input file (``s3://bucket/key`` or local path); null
                           with ``--path-privacy pseudonymize``
content_sha256  string     SHA-256 of the file's bytes (what "already scored" compares)
frame           int32      frame / slice index within the file (0 for a 2D image)
height, width   int32      size of the decoded frame in pixels (null when not decoded)
score           float32    calibrated anomaly score in [0, 1]
raw_score       float32    the head's uncalibrated score
label           int8       1 = anomalous at the artifact's calibrated threshold
mask_png        binary     anomaly mask at the frame's own resolution, 1-bit PNG
mask_area       int64      pixels set in the mask
peak_row,       int32      location of the anomaly map's maximum (frame pixels)
peak_col
modality        string     DICOM Modality ("" for a DICOM file without one, null for other formats)
study_key       string     HMAC-SHA256(ADCORE_STUDY_KEY_SECRET, StudyInstanceUID), hex;
                           null without the secret. The raw UID is never written.
model_name      string     artifact's model name
model_version   string     artifact's model_version (name-vN-<fingerprint>)
scored_at       timestamp  UTC time the row was produced
status          string     "ok" or "error"
error           string     "<kind>: <reason>" for errors (kinds: empty, truncated,
                           unsupported, corrupt, too_large, too_many_frames, invalid_header,
                           not_a_file, inference, read), else null
run_id          string     the run that wrote the row (sortable: UTC time + random)
schema_version  int16      ``SCHEMA_VERSION``
file_size       int64      the file's size in the listing it was scored from (version 2)
file_version    string     its ETag on S3, its mtime in ns locally (version 2): with the size,
                           what the next run compares to skip the file without reading it
category        string     the most likely anomaly category of a row labelled anomalous, for
                           models whose head tells categories apart (e.g. SD-MAD); null for
                           normal rows, error rows and models without categories (version 3)
category_scores map<string, per-category scores of such models, category name -> score in [0, 1];
                float32>   null otherwise (version 3)
=============== ========== ==========================================================

Older files lack the columns added since (``ADDED_COLUMNS``); readers give them nulls
(``jobs.scoring.ledger``), so version 1 and 2 runs and compacted tables stay readable.

Score columns are null on error rows. No patient name, ID, birth date or raw DICOM UID
is ever a column; with ``--path-privacy pseudonymize`` no path either (archive paths often
carry names, MRNs or accession numbers). Readers must look at one row per
``(image_key, frame, model_version)``:
the row of the latest *completed* run (see ``jobs.scoring.ledger``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import os

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 4
STATUS_OK, STATUS_ERROR = "ok", "error"
STATUS_SKIPPED = "skipped"  # internal marker for progress counts; never written
INFERENCE_ERROR = "inference"  # error kind of rows whose model call failed (transient: retried)
READ_ERROR = "read"  # the file could not be read (gone or changed since the listing, store down): transient
TOO_LARGE = "too_large"  # more bytes (listing) or pixels (header) than the job's bounds
NOT_A_FILE = "not_a_file"  # a FIFO, socket, device, folder link or link leaving the input: never read
TRANSIENT_ERROR_KINDS = (INFERENCE_ERROR, READ_ERROR)
KEY_COLUMNS = ("image_key", "frame", "model_version")
# The HMAC key of study_key and of pseudonymous image_key. study_key: read from the environment of
# whichever process uses it (each Ray worker reads its own, so no task or actor ever carries it);
# cluster nodes need it set. image_key: made by the driver from the listing.
SECRET_ENV = "ADCORE_STUDY_KEY_SECRET"
PATH_PRIVACY = ("keep", "pseudonymize")  # --path-privacy: the image_uri column filled, or null
MIN_SECRET_BYTES = 32  # an HMAC-SHA256 key shorter than its output can be guessed

SCHEMA = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("content_sha256", pa.string()),
        pa.field("frame", pa.int32(), nullable=False),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("raw_score", pa.float32()),
        pa.field("label", pa.int8()),
        pa.field("mask_png", pa.binary()),
        pa.field("mask_area", pa.int64()),
        pa.field("peak_row", pa.int32()),
        pa.field("peak_col", pa.int32()),
        pa.field("modality", pa.string()),
        pa.field("study_key", pa.string()),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("file_size", pa.int64()),
        pa.field("file_version", pa.string()),
        pa.field("category", pa.string()),
        pa.field("category_scores", pa.map_(pa.string(), pa.float32())),
        pa.field("schema_version", pa.int16(), nullable=False),
    ],
    metadata={"adcore.schema_version": str(SCHEMA_VERSION)},
)
# Columns by the schema version that added them: files of older versions lack them (null when read).
ADDED_COLUMNS = {2: ("file_size", "file_version"), 3: ("category", "category_scores"), 4: ("image_key",)}
# Added columns whose value in older files is another column's (not null): runs before version 4 kept paths.
DERIVED_COLUMNS = {"image_key": "image_uri"}


def with_added_columns(table: pa.Table, names=None) -> pa.Table:
    """``table`` with every column of ``ADDED_COLUMNS`` it lacks (among ``names``, default all): nulls, or
    for ``DERIVED_COLUMNS`` the column they equal in older files."""
    for version in sorted(ADDED_COLUMNS):
        for name in ADDED_COLUMNS[version]:
            if name not in table.column_names and (names is None or name in names):
                source = DERIVED_COLUMNS.get(name)
                if source in table.column_names:
                    values = table.column(source).cast(SCHEMA.field(name).type)
                else:
                    values = pa.nulls(table.num_rows, SCHEMA.field(name).type)
                table = table.append_column(SCHEMA.field(name), values)
    return table


def check_secret(secret: bytes | None, env: str = SECRET_ENV) -> bytes:
    """The HMAC key, refused (one line) when missing or shorter than ``MIN_SECRET_BYTES``."""
    if not secret or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{env} is {len(secret or b'')} bytes; use at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return secret


def image_keys(uris, privacy: str, secret: bytes | None) -> list[str]:
    """``image_key`` of each URI: the URI itself (``keep``) or its HMAC-SHA256 hex (``pseudonymize``)."""
    if privacy == "keep":
        return [str(u) for u in uris]
    if privacy != "pseudonymize":
        raise ValueError(f"--path-privacy {privacy!r}: expected one of {', '.join(PATH_PRIVACY)}")
    key = check_secret(secret)
    return [hmac.new(key, str(u).encode(), hashlib.sha256).hexdigest() for u in uris]


def scrub_paths(text: str | None, uri: str, replacement: str) -> str | None:
    """``text`` (an error message) with the URI, its path and its file name replaced by ``replacement``."""
    if not text:
        return text
    path = uri.split("://", 1)[-1]
    for part in sorted({uri, path, path.rsplit("/", 1)[-1]}, key=len, reverse=True):
        if part:
            text = text.replace(part, replacement)
    return text


def category_scores_value(names, scores) -> list[tuple[str, float]] | None:
    """One row's ``category_scores`` (name, score) pairs; None without categories."""
    if not names or scores is None:
        return None
    return [(str(n), float(v)) for n, v in zip(names, scores)]


def study_key_secret() -> bytes | None:
    """The HMAC key from this process's ``ADCORE_STUDY_KEY_SECRET``; None when it is unset.

    Raises:
        ValueError: it is shorter than ``MIN_SECRET_BYTES`` (one line, without the value).
    """
    value = os.environ.get(SECRET_ENV, "").encode()
    return check_secret(value) if value else None


def study_key(study_uid: str | None, secret: bytes | None) -> str | None:
    """Pseudonymous study key: HMAC-SHA256 of the UID; None without a UID or a secret."""
    if not study_uid or not secret:
        return None
    return hmac.new(secret, study_uid.encode(), hashlib.sha256).hexdigest()


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_error(kind: str, reason: str) -> str:
    """The ``error`` column: ``"<kind>: <reason>"``."""
    return f"{kind}: {reason}"


def error_kind(error: str | None) -> str | None:
    """The kind part of an ``error`` value."""
    return error.split(":", 1)[0] if error else None


def encode_mask(mask: np.ndarray) -> bytes:
    """Bool mask [H, W] -> 1-bit PNG bytes (a 512x512 mask is a few hundred bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_mask`."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("1"), dtype=bool)


def new_run_id(now: dt.datetime | None = None, token: str | None = None) -> str:
    """Sortable run id, ``YYYYMMDDTHHMMSSZ-<8 hex>``; later runs sort later."""
    import uuid

    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{token or uuid.uuid4().hex[:8]}"


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def to_table(
    columns: dict[str, list], *, model_name: str, model_version: str, run_id: str, scored_at: dt.datetime
) -> pa.Table:
    """Per-row column lists (+ the run's constants) -> a table in ``SCHEMA`` order and types.

    ``image_key`` defaults to ``image_uri`` (paths kept); the run's sink sets it for its privacy mode.
    """
    n = len(columns["image_uri"])
    columns = {"image_key": columns["image_uri"], **columns}
    const = {
        "model_name": [model_name] * n,
        "model_version": [model_version] * n,
        "run_id": [run_id] * n,
        "scored_at": [scored_at] * n,
        "schema_version": [SCHEMA_VERSION] * n,
    }
    data = {**columns, **const}
    arrays = [pa.array(data.get(f.name, [None] * n), type=f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)
