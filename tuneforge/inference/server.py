"""The engine's HTTP side: OpenAI's `/v1/chat/completions` and `/v1/completions`, reached only by
the API (which adds the routing field `tuneforge`), answering whole objects or SSE chunks.

A client that goes away cancels its sequences: the stream's generator is closed (streaming) or the
handler sees the disconnect (whole answers); its queue slot is free at once, and the decoding loop
drops its rows at its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from tuneforge.config import Settings
from tuneforge.inference.adapters import AdapterFetcher
from tuneforge.inference.engine import Engine, EngineError, Event, Generation, Sampling, TokenLogprob
from tuneforge.inference.protocol import FIELD, ChatCompletionRequest, CompletionRequest, Route

DONE = b"data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _bad_request(exc: ValidationError) -> EngineError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return EngineError(400, first["msg"], code="invalid_request", param=param)


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


class _Shape:
    """OpenAI's objects for one kind of request (chat or text completion)."""

    def __init__(self, chat: bool, model: str, include_usage: bool, logprobs: bool) -> None:
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": self.id,
            "object": kind if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def chunk(self, event: Event, offsets: dict[int, int], first: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": event.index,
            "finish_reason": event.finish_reason,
            "logprobs": None,
        }
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if event.kind == "delta" or first:
                delta["content"] = event.text
            choice["delta"] = delta
            if self.logprobs and event.logprobs:
                choice["logprobs"] = _chat_logprobs(event.logprobs)
        else:
            choice["text"] = event.text
            if self.logprobs and event.logprobs:
                choice["logprobs"] = _completion_logprobs(event.logprobs, offsets.get(event.index, 0))
            offsets[event.index] = offsets.get(event.index, 0) + len(event.text)
        body = self._head(True)
        body["choices"] = [choice]
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage}

    def whole(
        self,
        texts: dict[int, str],
        reasons: dict[int, str],
        logprobs: dict[int, list[TokenLogprob]],
        usage: dict[str, int],
    ) -> dict[str, Any]:
        choices = []
        for index in sorted(texts):
            entries = logprobs.get(index, [])
            if self.chat:
                choice: dict[str, Any] = {
                    "index": index,
                    "message": {"role": "assistant", "content": texts[index], "refusal": None},
                    "logprobs": _chat_logprobs(entries) if self.logprobs else None,
                    "finish_reason": reasons.get(index, "stop"),
                }
            else:
                choice = {
                    "index": index,
                    "text": texts[index],
                    "logprobs": _completion_logprobs(entries, 0) if self.logprobs else None,
                    "finish_reason": reasons.get(index, "stop"),
                }
            choices.append(choice)
        return {**self._head(False), "choices": choices, "usage": usage}


async def _next(generation: Generation) -> Event:
    return await generation.queue.get()


async def _stream(generation: Generation, shape: _Shape, first: Event) -> AsyncIterator[bytes]:
    offsets: dict[int, int] = {}
    started: set[int] = set()
    event = first
    try:
        while True:
            if event.kind == "error":
                assert event.error is not None
                yield _sse(event.error.body())
                break
            if event.kind == "done":
                if shape.include_usage and event.usage is not None:
                    yield _sse(shape.usage_chunk(event.usage))
                break
            yield _sse(shape.chunk(event, offsets, event.index not in started and shape.chat))
            started.add(event.index)
            event = await _next(generation)
        yield DONE
    finally:
        generation.cancel()  # a no-op once finished; stops the rows of a client that left


async def _whole(generation: Generation, shape: _Shape, request: Request) -> Response:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    for index in range(generation.sequences):
        texts[index] = ""
    checked = time.monotonic()
    try:
        while True:
            get = asyncio.ensure_future(_next(generation))
            while not get.done():
                done, _ = await asyncio.wait({get}, timeout=1.0)
                # Once a second, events or not: a decoding answer has events every step.
                if not done or time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        get.cancel()
                        generation.cancel()
                        return Response(status_code=499)
            event = get.result()
            if event.kind == "error":
                assert event.error is not None
                return JSONResponse(event.error.body(), status_code=event.error.status)
            if event.kind == "done":
                assert event.usage is not None
                return JSONResponse(shape.whole(texts, reasons, logprobs, event.usage))
            texts[event.index] = texts.get(event.index, "") + event.text
            logprobs.setdefault(event.index, []).extend(event.logprobs)
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
    finally:
        generation.cancel()


def create_engine_app(settings: Settings) -> FastAPI:
    from tuneforge.storage import store_from_settings
    from tuneforge.training.base_models import resolve_model_path

    fetcher = AdapterFetcher(store_from_settings(settings), settings.data_dir / "inference-cache")
    engine = Engine(
        lambda model_id: resolve_model_path(model_id, settings.models, settings.models_dir),
        fetcher,
        adapters_per_base=settings.inference_adapters_per_base,
        max_batch=settings.inference_max_batch,
        max_queued=settings.inference_max_queued,
        timeout_seconds=settings.inference_timeout_seconds,
        full_models=settings.inference_full_models,
    )
    app = FastAPI(title="Tuneforge inference engine", docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            EngineError(400, str(exc.errors()[:1]), code="invalid_request").body(), status_code=400
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        with engine.lock:
            runners = dict(engine.runners)
        return {
            "status": "ok",
            "in_flight": engine.in_flight,
            "models": sorted(runners),
            "batches": {key: asdict(runner.stats) for key, runner in sorted(runners.items())},
        }

    async def serve(request: Request, chat: bool) -> Response:
        body = await request.json()
        try:
            route = Route.model_validate(body.pop(FIELD))
            parsed: ChatCompletionRequest | CompletionRequest = (
                ChatCompletionRequest.model_validate(body) if chat else CompletionRequest.model_validate(body)
            )
        except (ValidationError, KeyError, TypeError) as exc:
            raise (
                _bad_request(exc)
                if isinstance(exc, ValidationError)
                else EngineError(400, "The request names no route.", code="invalid_request")
            ) from exc
        if isinstance(parsed, ChatCompletionRequest):
            max_tokens = parsed.max_completion_tokens or parsed.max_tokens or settings.inference_max_tokens
            logprobs, top = parsed.logprobs, parsed.top_logprobs or 0
            messages: list[dict[str, Any]] | None = [m.as_template_message() for m in parsed.messages]
            prompts = None
        else:
            max_tokens = parsed.max_tokens or settings.inference_max_tokens
            logprobs, top = parsed.logprobs is not None, parsed.logprobs or 0
            messages = None
            prompts = [parsed.prompt] if isinstance(parsed.prompt, str) else list(parsed.prompt)
        sampling = Sampling(
            max_tokens, parsed.temperature, parsed.top_p, parsed.stops(), parsed.seed, logprobs, top
        )
        generation = engine.submit(route, sampling, n=parsed.n, messages=messages, prompts=prompts)
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        shape = _Shape(chat, parsed.model, include_usage, logprobs)
        if not parsed.stream:
            return await _whole(generation, shape, request)
        first = await _next(generation)  # an error before any text is still a status code
        if first.kind == "error":
            assert first.error is not None
            return JSONResponse(first.error.body(), status_code=first.error.status)
        return StreamingResponse(_stream(generation, shape, first), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, chat=False)

    return app


def run_engine(host: str | None, port: int | None, uds: str | None) -> int:
    """`tuneforge inference`: the engine on a TCP port, or on the embedded Unix socket."""
    import logging

    import uvicorn

    from tuneforge.config import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_engine_app(settings)
    if uds is None and host is None and port is None and not settings.inference_engine_url:
        uds = str(settings.inference_socket)
    if uds is not None:
        from pathlib import Path

        Path(uds).unlink(missing_ok=True)
        print(f"Tuneforge inference engine on unix:{uds}", flush=True)
        uvicorn.run(app, uds=uds, log_level="info", access_log=False, timeout_graceful_shutdown=5)
    else:
        host, port = host or "127.0.0.1", port or 8001
        print(f"Tuneforge inference engine on http://{host}:{port}", flush=True)
        uvicorn.run(
            app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=5
        )
    return 0
