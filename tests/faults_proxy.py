"""A fault-injecting HTTP proxy in front of an HTTP server: some requests get ``503``.

Clients point ``AWS_ENDPOINT_URL`` (or a DICOMweb URL) at the proxy; it forwards each request to
the real server (the moto server of ``tests/conftest.py``, an Orthanc) unchanged, except that
the first ``fail_first`` and then a seeded random share of the requests whose method is in
``methods`` and whose path matches ``paths`` are answered at once with HTTP 503 (by default
S3's throttling error, XML code ``SlowDown``), as a server under load does. Counts per method and
path are kept, so tests can tell what a run read.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

NO_SUCH_KEY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
    b"<Message>The specified key does not exist.</Message><RequestId>fault</RequestId></Error>"
)
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
# Hop-by-hop headers: never forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """A threaded proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    Args:
        upstream: The real S3 endpoint.
        share: Fraction of matching requests answered 503 SlowDown (0 = none).
        seed: Seed of the fault draws.
        methods: Request methods that can be faulted.
        paths: Regular expression the request path (with query) must match to be faulted.
        gone: Regular expression of object paths that read as deleted (GET and HEAD answered 404
            NoSuchKey) while still listed: a file removed between the listing and the read.
        fail_first: The first this many matching requests are answered 503 (a server down for a while).
        reply: (content type, body) of the 503 answers.
    """

    def __init__(
        self,
        upstream: str,
        share: float = 0.0,
        seed: int = 0,
        methods=("GET", "PUT", "POST"),
        paths="",
        gone="",
        fail_first: int = 0,
        reply: tuple[str, bytes] = ("application/xml", SLOW_DOWN),
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.share, self.methods, self.paths = share, set(methods), re.compile(paths)
        self.gone = re.compile(gone) if gone else None
        self._rng = random.Random(seed)
        self.fail_first, self.reply = fail_first, reply
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (method, path without query) -> requests forwarded
        self.faults: Counter = Counter()  # method -> requests answered 503
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path_contains: str) -> int:
        """GETs forwarded (not faulted) whose path contains ``path_contains``."""
        with self._lock:
            return sum(n for (m, p), n in self.requests.items() if m == "GET" and path_contains in p)

    def read(self, path_contains: str) -> set[str]:
        """Paths (without query) that got a forwarded GET, among those containing ``path_contains``."""
        with self._lock:
            return {p for (m, p) in self.requests if m == "GET" and path_contains in p}

    def _fault(self, method: str, path: str) -> bool:
        if method not in self.methods or not self.paths.search(path):
            return False
        with self._lock:
            hit = sum(self.faults.values()) < self.fail_first or self._rng.random() < self.share
            if hit:
                self.faults[method] += 1
            return hit

    def _count(self, method: str, path: str) -> None:
        with self._lock:
            self.requests[(method, path.split("?", 1)[0])] += 1

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # a HEAD's length is the object's: passed on as it is
                for k, v in headers:
                    if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head or not any(k.lower() == "content-length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _any(self) -> None:
                body = self._body()
                if proxy.gone and self.command in ("GET", "HEAD") and proxy.gone.search(self.path.split("?", 1)[0]):
                    self._reply(404, [("Content-Type", "application/xml")], NO_SUCH_KEY)
                    return
                if proxy._fault(self.command, self.path):
                    self._reply(503, [("Content-Type", proxy.reply[0])], proxy.reply[1])
                    return
                proxy._count(self.command, self.path)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self._reply(resp.status, resp.getheaders(), data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        return Handler
