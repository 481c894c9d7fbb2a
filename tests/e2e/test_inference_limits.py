"""What serving promises beyond the answers, on `make run`'s stack with the base model
`tuneforge/tiny-chat` (no training job): the API process never loads torch while the inference
process does; a client that drops a completion mid-answer frees its queue slots in the engine
(streaming or not); a completion past the engine's timeout is a 504 in OpenAI's error shape (an
error event once a stream has started).

The evidence of cancellation is the engine's own count of queued sequences (`in_flight` of its
/healthz, on the embedded Unix socket) and its queue limit: a request that fills the queue makes
the next one a 429 until its client goes, and then a new one is served. Greedy decoding of
tiny-chat never ends on its own (it repeats one token), so with `max_tokens` in the millions only
cancellation, or a timeout far beyond the waits here, can end such an answer.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import psutil
import pytest

from tests.support import wait_for

from .conftest import Stack

pytestmark = pytest.mark.slow

MODEL = "tuneforge/tiny-chat"
QUEUE = 4
"""The engine's queue limit, in sequences; an endless request with n=QUEUE fills it."""
EMBEDDED_ENV = {
    "TUNEFORGE_INFERENCE_MAX_QUEUED": str(QUEUE),
    "TUNEFORGE_INFERENCE_TIMEOUT_SECONDS": "600",
}
"""Read by the `embedded` fixture. An endless answer runs for 600 s unless cancelled, ten times
the longest wait for its slots to come back."""
SHORT_TIMEOUT = 3
"""The engine's timeout for the last tests (a new engine): a one-token answer takes milliseconds."""
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
ENDLESS: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 10**7}
ONE_TOKEN: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 1}


def _engine_health(stack: Stack) -> dict[str, Any]:
    """The inference process's /healthz, on the embedded socket the API forwards to."""
    transport = httpx.HTTPTransport(uds=str(stack.tmp / "data" / "inference.sock"))
    with httpx.Client(transport=transport, base_url="http://engine", timeout=30) as engine:
        answer: dict[str, Any] = engine.get("/healthz").raise_for_status().json()
        return answer


def _in_flight(stack: Stack) -> int:
    return int(_engine_health(stack)["in_flight"])


def _one_token(stack: Stack) -> httpx.Response:
    with stack.http() as client:
        return client.post("/v1/chat/completions", json=ONE_TOKEN)


def _served(stack: Stack) -> None:
    """Waits until a one-token chat completion is answered (the engine started, tiny-chat loaded)."""

    def answered() -> bool:
        try:
            return _one_token(stack).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answered, 180, "a one-token chat completion", stack, interval=1)


def _assert_queue_full(stack: Stack) -> None:
    assert _in_flight(stack) == QUEUE
    refused = _one_token(stack)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


def _assert_slots_freed(stack: Stack) -> None:
    wait_for(lambda: _in_flight(stack) == 0, 60, "the engine to free the dropped request's slots", stack)
    answer = _one_token(stack)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 1


def _process(stack: Stack, name: str) -> psutil.Process:
    serve = psutil.Process(stack.processes["serve"].pid)
    if name == "serve":
        return serve
    return next(c for c in serve.children() if name in c.cmdline())


def _torch_libraries(process: psutil.Process) -> set[str]:
    return {m.path for m in process.memory_maps() if "/torch/" in m.path}


@pytest.fixture(scope="module")
def stack(embedded: Stack) -> Stack:
    _served(embedded)
    return embedded


def test_the_api_process_serves_chat_without_loading_torch(stack: Stack) -> None:
    answer = stack.sdk().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=4,
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    api, engine = _process(stack, "serve"), _process(stack, "inference")
    assert _torch_libraries(api) == set()
    assert any("libtorch" in path for path in _torch_libraries(engine))


def test_a_streaming_client_that_disconnects_frees_its_queue_slots(stack: Stack) -> None:
    assert _in_flight(stack) == 0
    client = stack.sdk().with_options(max_retries=0)
    stream = client.chat.completions.create(**ENDLESS, n=QUEUE, stream=True)
    chunk = next(c for c in stream if c.choices and c.choices[0].delta.content)
    assert chunk.choices[0].finish_reason is None  # mid-answer
    _assert_queue_full(stack)
    stream.close()
    _assert_slots_freed(stack)


def test_a_non_streaming_client_that_disconnects_frees_its_queue_slots(stack: Stack) -> None:
    """A whole answer sends nothing before its end, so the client is a bare socket that sends the
    request, waits until the engine holds its sequences, and closes."""
    assert _in_flight(stack) == 0
    url = urlsplit(stack.base_url)
    body = json.dumps({**ENDLESS, "n": QUEUE}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {stack.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(head.encode() + body)
        wait_for(lambda: _in_flight(stack) == QUEUE, 60, "the engine to take the request", stack)
        _assert_queue_full(stack)
    _assert_slots_freed(stack)


@pytest.fixture(scope="module")
def short_timeout(stack: Stack) -> Stack:
    """The stack with its engine replaced by one whose timeout is SHORT_TIMEOUT seconds, on the
    same socket (as a separately run `tuneforge inference` would be); the API stays as it is."""
    engine = _process(stack, "inference")
    engine.terminate()
    # `tuneforge serve` reaps its children only when it stops: the engine stays a zombie till then.
    wait_for(lambda: engine.status() == psutil.STATUS_ZOMBIE, 60, "the engine to exit", stack)
    stack.env["TUNEFORGE_INFERENCE_TIMEOUT_SECONDS"] = str(SHORT_TIMEOUT)
    stack.start("inference", "inference", "--uds", str(stack.tmp / "data" / "inference.sock"))
    _served(stack)
    return stack


TIMEOUT_ERROR = {
    "message": "The completion did not finish in time.",
    "type": "server_error",
    "param": None,
    "code": "timeout",
}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", ENDLESS),
        ("/v1/completions", {"model": MODEL, "prompt": "Once", "temperature": 0, "max_tokens": 10**7}),
    ],
)
def test_a_completion_past_the_engine_timeout_is_a_504(
    short_timeout: Stack, path: str, body: dict[str, Any]
) -> None:
    with short_timeout.http() as client:
        answer = client.post(path, json=body)
    assert answer.status_code == 504, answer.text
    assert answer.json() == {"error": TIMEOUT_ERROR}


def test_a_stream_past_the_engine_timeout_ends_with_a_timeout_error(short_timeout: Stack) -> None:
    client = short_timeout.sdk().with_options(max_retries=0)
    stream = client.chat.completions.create(**ENDLESS, stream=True)
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received and all(received)  # it had started answering
    assert raised.value.code == "timeout" and raised.value.body == TIMEOUT_ERROR
