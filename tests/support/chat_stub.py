"""A stub OpenAI-compatible chat completions server (a stand-in, not a model): it answers
`POST /v1/chat/completions` with whatever its `reply` function returns for the request body, and
keeps the bodies it received. Model graders are tested against it; a real Tuneforge
`/v1/chat/completions` speaks the same shape."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[dict[str, Any]], "str | tuple[int, str]"]


def send_json(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    """Answers a stub's request with `body` (a JSON string, or a value to encode) as JSON."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@dataclass
class ChatStub:
    base_url: str  # what TUNEFORGE_GRADER_MODEL_URL names: ".../v1"
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


@contextmanager
def chat_stub(reply: Reply) -> Iterator[ChatStub]:
    """`reply(body)` gives the assistant's text, or `(status, raw body)` for an error answer."""
    stub = ChatStub("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            stub.requests.append(body)
            stub.headers.append(dict(self.headers))
            if self.path != "/v1/chat/completions":
                answer: str | tuple[int, str] = (404, '{"error": {"message": "no such route"}}')
            else:
                answer = reply(body)
            if isinstance(answer, tuple):
                status, raw = answer
            else:
                status, raw = (
                    200,
                    json.dumps(
                        {
                            "id": "chatcmpl-stub",
                            "object": "chat.completion",
                            "model": body.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": answer},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                        }
                    ),
                )
            send_json(self, status, raw)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
