"""A real HTTP proxy on 127.0.0.1 in front of an S3 endpoint, failing chosen object downloads.

The pipeline's boto3 client talks to the proxy over TCP exactly as it would
to S3; the proxy forwards every request to the upstream endpoint (moto's
server) and, for GETs of keys with queued faults, answers instead with a 503
SlowDown or a body cut off halfway through. It counts object GETs per key.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyS3Proxy:
    """Forward to `upstream`; `fail(key, "503", "cut", ...)` queues faults for that key's next GETs."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.gets: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, key: str, *faults: str) -> None:
        with self.lock:
            self.faults[key].extend(faults)

    def object_gets(self) -> int:
        with self.lock:
            return sum(self.gets.values())

    def _next_fault(self, key: str) -> str | None:
        with self.lock:
            self.gets[key] += 1
            queued = self.faults.get(key)
            return queued.pop(0) if queued else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _object_key(self) -> str | None:
                parts = urlsplit(self.path)
                path = unquote(parts.path).lstrip("/")
                if self.command != "GET" or "/" not in path or parts.query:
                    return None  # listings and bucket calls carry a query or no key
                return path.split("/", 1)[1]

            def _forward(self) -> None:
                body = self._body()
                key = self._object_key()
                fault = proxy._next_fault(key) if key is not None else None
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in {"PUT", "POST"}:
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "cut":  # the promised length, then half of it, then the connection drops
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler

    @contextmanager
    def running(self) -> Iterator[FaultyS3Proxy]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
