"""DICOMweb reads without a PACS behind them: the byte bound when no Content-Length is sent, multipart parts."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.scoring import dicomweb, qido

BODY = b"D" * 300_000


class _NoLength(BaseHTTPRequestHandler):
    """Answers every GET with BODY, its end marked by closing the connection (no Content-Length)."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom")
        self.end_headers()
        try:
            for i in range(0, len(BODY), 4096):
                self.wfile.write(BODY[i : i + 4096])
        except OSError:
            pass  # the reader stopped reading


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _NoLength)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/dicom-web"
    srv.shutdown()
    srv.server_close()


def test_a_body_without_length_is_read_no_further_than_the_bound(server):
    reader = qido.WadoReader()
    uri = "dicomweb+" + server + "/studies/1.2/series/1.3/instances/1.4"
    assert reader.read(uri, len(BODY)) == BODY  # a plain application/dicom answer as it is
    with pytest.raises(dicomweb.TooLarge, match="more than"):
        reader.read(uri, 1000)


def test_first_part_of_a_multipart_answer():
    data = b"\x00DICM-ish\r\n--not-the-end"
    ctype = 'multipart/related; type="application/dicom"; boundary=b0und'
    with_length = b"--b0und\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n%s\r\n--b0und--\r\n"
    assert qido.first_part(with_length % (len(data), data), ctype) == data
    without = b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b0und--\r\n"
    assert qido.first_part(without, ctype) == data
    with pytest.raises(OSError, match="not a multipart body"):
        qido.first_part(b"garbage", ctype)


def test_filters_refuse_what_qido_cannot_mean():
    assert qido.Filters("20240101-", "CT").check().study_query() == {
        "StudyDate": "20240101-",
        "ModalitiesInStudy": "CT",
    }
    assert qido.Filters(modality="MR").series_query() == {"Modality": "MR"}
    for bad in (dict(study_date="2024-01-01"), dict(study_date="-"), dict(modality="ct&x=1")):
        with pytest.raises(SystemExit):
            qido.Filters(**bad).check()
