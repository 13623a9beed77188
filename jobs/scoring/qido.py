"""An archive in a PACS: listed by QIDO-RS, each instance read by WADO-RS (``--input dicomweb+http://...``).

**Listing.** The driver pages through ``<root>/studies`` (``limit``/``offset``, with the study
filters) keeping only the study UIDs; each page of studies is listed by one Ray task
(:func:`list_studies`: their series, then each series' instances, paged the same way), which
returns its rows as Arrow. The listing is a listing like any other (``uri``, ``size``,
``version``): ``uri`` is the instance's ``dicomweb+http(s)://.../studies/<study>/series/<series>/
instances/<sop>``, ``size`` is 0 (QIDO-RS does not tell; the read is bounded instead) and
``version`` is empty: a changed instance gets a new SOPInstanceUID, hence a new URI, so the
skip key of ``ledger.plan_inputs`` is the instance UID with the model version.

**Filters.** ``--qido-study-date FROM-TO`` (DICOM dates, either end open: ``20240101-``) is
StudyDate at the study level; ``--qido-modality CT`` is ModalitiesInStudy at the study level and
Modality at the series level (a study with CT and SR lists its CT series only).

**Reading.** :class:`WadoReader` GETs one instance (``multipart/related; type="application/dicom";
transfer-syntax=*``: the stored file, not transcoded), refused unread when its Content-Length
exceeds the bound, never read past it. Requests are retried as ``jobs/scoring/dicomweb.py``
says; an instance still unreadable is a ``read`` error row, tried again next night.

URIs hold DICOM UIDs: nothing here logs one (counts only), and errors never quote a URL.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from dataclasses import dataclass

import pyarrow as pa

from adcore import storage
from jobs.scoring import dicomweb
from jobs.scoring.dicomweb import TooLarge

log = logging.getLogger(__name__)

PAGE = 1000  # QIDO-RS results per request (limit); a page of studies is one listing task
QIDO_ACCEPT = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
DECODE_NAME = "dicomweb-instance.dcm"  # the name the decoder is given: DICOM, and no UID in any message
_DATE_RANGE = re.compile(r"^(\d{8})?-?(\d{8})?$")
_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class Filters:
    """QIDO-RS matching: ``study_date`` a DICOM date or range, ``modality`` a modality code ("" = any)."""

    study_date: str = ""
    modality: str = ""

    def check(self) -> Filters:
        if self.study_date and not _DATE_RANGE.match(self.study_date) or self.study_date == "-":
            raise SystemExit(f"--qido-study-date {self.study_date!r}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, or open")
        if self.modality and not re.fullmatch(r"[A-Z0-9_]{1,16}", self.modality):
            raise SystemExit(f"--qido-modality {self.modality!r}: expected a DICOM modality code such as CT or MR")
        return self

    def study_query(self) -> dict[str, str]:
        return {k: v for k, v in (("StudyDate", self.study_date), ("ModalitiesInStudy", self.modality)) if v}

    def series_query(self) -> dict[str, str]:
        return {"Modality": self.modality} if self.modality else {}


def root_of(uri: str) -> str:
    """The http(s) DICOMweb root of a ``dicomweb+http(s)://`` input, checked (one line when not usable)."""
    return dicomweb.check_http_url(dicomweb.http_url(uri), "--input dicomweb+")


def instance_uri(input_uri: str, study: str, series: str, sop: str) -> str:
    return f"{input_uri.rstrip('/')}/studies/{study}/series/{series}/instances/{sop}"


def _uids(datasets: list[dict], tag: str) -> list[str]:
    """The UID ``tag`` of each QIDO-RS result; a malformed one is left out (it could not name a WADO path)."""
    out = []
    for d in datasets:
        value = ((d or {}).get(tag) or {}).get("Value") or [None]
        if isinstance(value[0], str) and _UID.match(value[0]):
            out.append(value[0])
    return out


def _search(client: dicomweb.Client, path: str, query: dict[str, str], tag: str) -> list[str]:
    """Every result's ``tag`` of one QIDO-RS search, page by page."""
    out, offset = [], 0
    while True:
        q = urllib.parse.urlencode({**query, "limit": PAGE, "offset": offset, "includefield": tag})
        body, _ = client.get(f"{path}?{q}", QIDO_ACCEPT, "QIDO-RS search")
        page = json.loads(body) if body.strip() else []  # 204 No Content: none
        out += _uids(page, tag)
        if len(page) < PAGE:
            return out
        offset += len(page)


def list_studies(input_uri: str, studies: list[str], filters: Filters) -> pa.Table:
    """The instances of ``studies`` (a task's page of study UIDs) as a listing table."""
    client = dicomweb.Client(root_of(input_uri))
    uris = []
    for study in studies:
        for series in _search(client, f"/studies/{study}/series", filters.series_query(), SERIES_UID):
            for sop in _search(client, f"/studies/{study}/series/{series}/instances", {}, SOP_UID):
                uris.append(instance_uri(input_uri, study, series, sop))
    n = len(uris)
    return pa.table(
        [pa.array(uris, pa.string()), pa.array([0] * n, pa.int64()), pa.array([""] * n, pa.string())],
        schema=storage._listing_schema(),
    )


def list_archive(input_uri: str, filters: Filters, map_tasks, start=None) -> pa.Table:
    """The listing of a DICOMweb ``input_uri``: study pages here, each page's instances in a task."""
    client = dicomweb.Client(root_of(input_uri))
    pages, offset = [], 0
    try:
        while True:
            q = urllib.parse.urlencode({**filters.study_query(), "limit": PAGE, "offset": offset})
            body, _ = client.get(f"/studies?{q}&includefield={STUDY_UID}", QIDO_ACCEPT, "QIDO-RS search")
            page = json.loads(body) if body.strip() else []
            if _uids(page, STUDY_UID):
                pages.append(_uids(page, STUDY_UID))
            if len(page) < PAGE:
                break
            offset += len(page)
        parts = map_tasks(list_studies, [(input_uri, p, filters) for p in pages], start)
    except dicomweb.DicomWebError as e:
        raise SystemExit(f"--input: the DICOMweb server did not answer a QIDO-RS search ({e})") from None
    table = pa.concat_tables(parts) if parts else storage._listing_schema().empty_table()
    studies = sum(map(len, pages))
    log.info("QIDO-RS: %d instance(s) in %d stud(ies), listed by %d task(s)", table.num_rows, studies, len(pages))
    return table.sort_by("uri")


class WadoReader:
    """Reads listed instances by WADO-RS; its client (and credentials) is made in the process that reads."""

    def __init__(self):
        self._clients: dict[str, dicomweb.Client] = {}

    def __getstate__(self) -> dict:
        return {"_clients": {}}

    def read(self, uri: str, max_bytes: int | None) -> bytes:
        """The instance's Part 10 bytes; :class:`TooLarge` over ``max_bytes``, ``OSError`` when unreadable."""
        http = dicomweb.http_url(uri)
        root, sep, rest = http.partition("/studies/")
        client = self._clients.get(root)
        if client is None:
            client = self._clients[root] = dicomweb.Client(root)
        limit = None if max_bytes is None else max_bytes + dicomweb.MULTIPART_SLACK
        try:
            body, ctype = client.get(sep + rest, WADO_ACCEPT, "WADO-RS read", limit)
        except dicomweb.DicomWebError as e:
            raise OSError(f"WADO-RS read failed: {e}") from None
        data = first_part(body, ctype)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(f"{len(data)} bytes")
        return data


def first_part(body: bytes, content_type: str) -> bytes:
    """The content of the first part of a ``multipart/related`` body (a plain body as it is)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/") or not m:
        return body
    delim = b"--" + m.group(1).encode()
    start = body.find(delim)
    head_end = body.find(b"\r\n\r\n", start)
    if start < 0 or head_end < 0:
        raise OSError("WADO-RS answer is not a multipart body")
    headers = body[start + len(delim) : head_end].decode("latin-1")
    content = head_end + 4
    length = re.search(r"(?im)^content-length:\s*(\d+)\s*$", headers)
    if length:
        return body[content : content + int(length.group(1))]
    end = body.find(b"\r\n" + delim, content)
    if end < 0:
        raise OSError("WADO-RS answer ends before its part does")
    return body[content:end]
