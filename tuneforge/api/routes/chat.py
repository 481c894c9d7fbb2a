"""/v1/chat/completions and /v1/completions: the caller's model name resolved here (base model on
offer, `ft:` model or `ft:…:ckpt-step-N` checkpoint of the caller's project), the request
forwarded to the inference engine over HTTP and its answer (whole, or SSE chunks) passed back.

The API process imports no torch: `tuneforge inference` (or a vLLM server, `inference_url`) runs
the models. A client that disconnects closes the forwarded request, which cancels its sequences.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

import httpx
from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field
from sqlalchemy.orm import Session, sessionmaker

from tuneforge.api.deps import ProjectDep
from tuneforge.api.errors import BadRequest, NotFound, ServiceUnavailable, TuneforgeError
from tuneforge.api.responses import NOT_FOUND, _error, _Open
from tuneforge.config import Settings
from tuneforge.inference.protocol import (
    FIELD,
    AdapterFamily,
    AdapterRef,
    ChatCompletionRequest,
    CompletionRequest,
    Route,
)
from tuneforge.models import checkpoint as checkpoints
from tuneforge.models import job as jobs
from tuneforge.training.base_models import list_base_models

router = APIRouter(prefix="/v1", tags=["inference"])
T = TypeVar("T")

CHECKPOINT_MARK = ":ckpt-step-"
FAMILIES: dict[str, AdapterFamily] = {
    "lora": "lora",
    "dora": "lora",
    "qlora": "lora",
    "ia3": "ia3",
    "prompt_tuning": "prompt_tuning",
    "prefix_tuning": "prefix_tuning",
}
"""Each servable adapter type's family in the engine (`full` is served as a model of its own)."""


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]] = Field(description="`index`, `message`, `logprobs`, `finish_reason`.")
    usage: Usage


class TextCompletion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]] = Field(description="`index`, `text`, `logprobs`, `finish_reason`.")
    usage: Usage


def _answers(model: type[_Open]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": model,
            "description": "The completion; with `stream: true`, server-sent events of chunks ending "
            "with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **NOT_FOUND,
        **_error(504, "The completion did not finish within the engine's timeout."),
    }


class InferenceError(TuneforgeError):
    """An answer of the engine other than 200, passed on as it is."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error") or {}
        super().__init__(
            str(error.get("message") or "The inference engine refused the request."),
            param=error.get("param"),
            code=error.get("code"),
            status_code=status,
            type=error.get("type") or "invalid_request_error",
        )


ENGINE_DOWN = ServiceUnavailable(
    "The inference engine is unavailable; retry the request.", code="service_unavailable"
)


def resolve_route(session: Session, settings: Settings, project_id: str, model: str) -> Route:
    """The weights that serve `model` for this project; 404 `model_not_found` for anything else
    (another project's models included)."""
    if any(entry.id == model for entry in list_base_models(settings.models, settings.models_dir)):
        return Route(base_model=model)
    name, mark, step = model.rpartition(CHECKPOINT_MARK)
    job = jobs.find_fine_tuned_model(session, project_id, name if mark else model)
    if job is None or (mark and not step.isdigit()):
        raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
    adapter_type = str((job.spec.get("adapter") or {}).get("type") or "lora")
    if adapter_type != "full" and adapter_type not in FAMILIES:
        raise BadRequest(
            f"The model '{model}' is a {adapter_type} adapter, which cannot be served.",
            param="model",
            code="model_not_supported",
        )
    kind = "model" if adapter_type == "full" else "adapter"
    if mark:
        found = [
            c
            for c in checkpoints.list_checkpoints(session, job.id, limit=10_000)
            if c.step_number == int(step)
        ]
        if not found:
            raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        storage_key = found[0].storage_key
    else:
        artifact = checkpoints.get_artifact(session, job.id, "model" if kind == "model" else "adapter")
        if artifact is None:
            raise NotFound(
                f"The model '{model}' has no stored weights.", param="model", code="model_not_found"
            )
        storage_key = artifact.storage_key
    base = getattr(job, "base_model", None) or job.model
    family = FAMILIES.get(adapter_type, "lora")
    return Route(base_model=base, adapter=AdapterRef(storage_key=storage_key, kind=kind, family=family))


def _resolve(factory: sessionmaker[Session], settings: Settings, project_id: str, model: str) -> Route:
    with factory() as session:
        return resolve_route(session, settings, project_id, model)


def _client(request: Request) -> httpx.AsyncClient:
    """One pooled client per API process, to the engine's socket or URL."""
    state = request.app.state
    client: httpx.AsyncClient | None = getattr(state, "inference_client", None)
    if client is None:
        settings: Settings = state.settings
        timeout = httpx.Timeout(settings.inference_timeout_seconds + 30, connect=10)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        if settings.inference_url:
            client = httpx.AsyncClient(
                base_url=settings.inference_url.rstrip("/"), timeout=timeout, limits=limits
            )
        elif settings.inference_engine_url:
            client = httpx.AsyncClient(
                base_url=settings.inference_engine_url.rstrip("/"), timeout=timeout, limits=limits
            )
        else:
            transport = httpx.AsyncHTTPTransport(uds=str(settings.inference_socket), limits=limits)
            client = httpx.AsyncClient(base_url="http://engine", transport=transport, timeout=timeout)
        state.inference_client = client
    return client


async def _passthrough(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


async def _until_disconnect(request: Request, work: asyncio.Future[T]) -> T | None:
    """`work`'s result, or None (and `work` cancelled) once the client has gone."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=1.0)
        if done:
            return work.result()
        if await request.is_disconnected():
            if not work.cancel():  # it ended meanwhile
                return work.result()
            return None


async def _forward(request: Request, path: str, body: dict[str, Any], stream: bool) -> Response:
    client = _client(request)
    # The engine sends a whole answer's headers with its end: a client that leaves before then
    # must close the forwarded request too, or its sequences run on until they end or time out.
    sending = asyncio.ensure_future(client.send(client.build_request("POST", path, json=body), stream=True))
    try:
        upstream = await _until_disconnect(request, sending)
    except httpx.TransportError as exc:
        raise ENGINE_DOWN from exc
    if upstream is None:
        return Response(status_code=499)
    if upstream.status_code != 200:
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        try:
            error = json.loads(content)
        except ValueError:
            raise ENGINE_DOWN from None
        if upstream.status_code >= 500 and upstream.status_code != 504:
            raise ENGINE_DOWN
        raise InferenceError(upstream.status_code, error if isinstance(error, dict) else {})
    if stream:
        return StreamingResponse(_passthrough(upstream), media_type="text/event-stream")

    async def read() -> Response:
        try:
            return Response(await upstream.aread(), media_type="application/json")
        finally:
            await upstream.aclose()

    try:
        answer = await _until_disconnect(request, asyncio.ensure_future(read()))
    except httpx.TimeoutException as exc:
        raise TuneforgeError(
            "The completion did not finish in time.", code="timeout", status_code=504
        ) from exc
    except httpx.TransportError as exc:
        raise ENGINE_DOWN from exc
    return answer if answer is not None else Response(status_code=499)


async def _complete(
    request: Request, caller: ProjectDep, path: str, body: ChatCompletionRequest | CompletionRequest
) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    route = await to_thread.run_sync(
        _resolve, state.read_sessionmaker, settings, caller.project_id, body.model
    )
    payload = body.model_dump(exclude_none=True)
    if settings.inference_url:
        from tuneforge.api.services.vllm import forget_vllm, prepare_vllm

        if route.adapter is not None and route.adapter.family != "lora":
            raise BadRequest(
                f"The model '{body.model}' is a {route.adapter.family} adapter; the vLLM backend "
                "serves LoRA adapters only.",
                param="model",
                code="model_not_supported",
            )

        client = _client(request)
        payload = await prepare_vllm(client, state.store, settings, route, payload)
        try:
            return await _forward(request, path, payload, body.stream)
        except InferenceError as exc:
            # A restarted vLLM has forgotten the adapters handed to it: hand this one over again.
            if exc.status_code != 404 or not forget_vllm(client, body.model):
                raise
        payload = await prepare_vllm(client, state.store, settings, route, payload)
    else:
        payload[FIELD] = route.model_dump()
    return await _forward(request, path, payload, body.stream)


@router.post(
    "/chat/completions",
    summary="Create a chat completion with a base, fine-tuned or checkpoint model",
    responses=_answers(ChatCompletion),
)
async def chat_completions(body: ChatCompletionRequest, caller: ProjectDep, request: Request) -> Response:
    return await _complete(request, caller, "/v1/chat/completions", body)


@router.post(
    "/completions",
    summary="Create a text completion with a base, fine-tuned or checkpoint model",
    responses=_answers(TextCompletion),
)
async def completions(body: CompletionRequest, caller: ProjectDep, request: Request) -> Response:
    return await _complete(request, caller, "/v1/completions", body)
