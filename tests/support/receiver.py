"""A webhook receiver for tests: an HTTP server on 127.0.0.1 that records every request and
answers each path with the statuses it is told (one per request, the last one repeated)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    answers: dict[str, list[int]] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str, *statuses: int) -> str:
        """The URL of `path`, which answers `statuses` in turn (then the last one; default 200)."""
        with self.lock:
            self.answers[path] = list(statuses) or [200]
        return self.base_url + path

    def received(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            self.requests.append(Received(path, headers, body))
            statuses = self.answers.get(path, [404])
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_receiver() -> Receiver:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            status = receiver._answer(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("location", "/redirected")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = Receiver(server)
    threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True).start()
    return receiver
