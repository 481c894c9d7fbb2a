"""/v1/webhook_endpoints: OpenAI's webhook endpoint API, per project (what the official SDK's
`client.webhooks.create/retrieve/update/list/delete/rotate_secret/test` send), plus the
deliveries of an endpoint (a Tuneforge extension) and /v1/webhook_event_types.

The signing secret is shown only by create and rotate_secret; every other answer has its hint.
Deliveries are made by the beat process (tuneforge/worker/webhooks.py); `test` sends one at
once, from the API, and answers what the endpoint answered."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.api.deps import ProjectDep, SessionDep, SettingsDep
from tuneforge.api.errors import BadRequest, NotFound
from tuneforge.api.paging import After, cursor_row
from tuneforge.api.responses import NOT_FOUND, ok
from tuneforge.api.schemas import list_page, unix
from tuneforge.config import Settings
from tuneforge.db import utcnow
from tuneforge.models import webhook
from tuneforge.worker.webhooks import HostUnresolved, UrlRefused, attempt, check_url, resolve

router = APIRouter(prefix="/v1/webhook_endpoints", tags=["webhooks"])
event_types_router = APIRouter(prefix="/v1/webhook_event_types", tags=["webhooks"])

EndpointId = Annotated[str, Path(description="A webhook endpoint id (we_...).")]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]

EVENT_TYPES_HELP = f"Event types that trigger deliveries: {', '.join(webhook.JOB_EVENT_TYPES)}."


# --- bodies ---------------------------------------------------------------------------------------


EventType = webhook.JobEventType


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256, description="A name for the endpoint.")
    url: str = Field(min_length=1, max_length=2048, description="The HTTPS URL deliveries go to.")
    event_types: list[EventType] = Field(min_length=1, description=EVENT_TYPES_HELP)


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=256, description="A new name.")
    url: str | None = Field(None, min_length=1, max_length=2048, description="A new HTTPS URL.")
    event_types: list[EventType] | None = Field(
        None, min_length=1, description="The complete new set. " + EVENT_TYPES_HELP
    )


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_old_secret_active_for_24_hours: bool = Field(
        False, description="Deliveries carry a signature with the old secret too for 24 hours."
    )


class TestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: EventType = Field(description="The event type of the sample delivery. " + EVENT_TYPES_HELP)


# --- answers (for the OpenAPI document) -----------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class WebhookEndpointObject(_Open):
    id: str = Field(description="we_...")
    object: Literal["webhook_endpoint"]
    name: str
    url: str
    event_types: list[str]
    created_at: int
    updated_at: int
    signing_secret_hint: str


class WebhookEndpointWithSecret(WebhookEndpointObject):
    signing_secret: str = Field(description="Shown only at creation and rotation.")


class WebhookEndpointList(_Open):
    object: Literal["list"]
    data: list[WebhookEndpointObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class WebhookEndpointDeleted(_Open):
    id: str
    object: Literal["webhook_endpoint.deleted"]
    deleted: Literal[True]


class WebhookEndpointTestResult(_Open):
    object: Literal["webhook_endpoint.test"]
    webhook_endpoint_id: str
    event_type: str
    status_code: int
    success: Literal[True]


class WebhookDeliveryObject(_Open):
    id: str = Field(description="wh_...: the `webhook-id` header, the same on every attempt.")
    object: Literal["webhook_endpoint.delivery"]
    webhook_endpoint_id: str
    event_id: str
    event_type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: int
    last_attempt_at: int | None
    next_attempt_at: int | None
    delivered_at: int | None
    event: dict[str, Any] = Field(description="The payload every attempt sends.")


class WebhookDeliveryList(_Open):
    object: Literal["list"]
    data: list[WebhookDeliveryObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class WebhookEventTypeList(_Open):
    object: Literal["list"]
    data: list[str]


# --- shapes ---------------------------------------------------------------------------------------


def endpoint_object(endpoint: webhook.WebhookEndpoint, *, secret: str | None = None) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "id": endpoint.id,
        "object": "webhook_endpoint",
        "name": endpoint.name,
        "url": endpoint.url,
        "event_types": list(endpoint.event_types),
        "created_at": unix(endpoint.created_at),
        "updated_at": unix(endpoint.updated_at),
        "signing_secret_hint": webhook.secret_hint(endpoint.signing_secret),
    }
    if secret is not None:
        shown["signing_secret"] = secret
    return shown


def delivery_object(delivery: webhook.WebhookDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "object": "webhook_endpoint.delivery",
        "webhook_endpoint_id": delivery.endpoint_id,
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": unix(delivery.created_at),
        "last_attempt_at": unix(delivery.last_attempt_at),
        "next_attempt_at": unix(delivery.next_attempt_at),
        "delivered_at": unix(delivery.delivered_at),
        "event": json.loads(delivery.body),
    }


# --- routes ---------------------------------------------------------------------------------------


def _endpoint(session: SessionDep, caller: ProjectDep, endpoint_id: str) -> webhook.WebhookEndpoint:
    endpoint = webhook.get_endpoint(session, caller.project_id, endpoint_id)
    if endpoint is None:
        raise NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_endpoint_id")
    return endpoint


def _checked_url(settings: Settings, url: str) -> str:
    """The URL policy at creation: what the sender would refuse is a 400 now. A host that does
    not resolve yet is accepted (each attempt resolves and checks it again)."""
    try:
        target = check_url(url, settings.webhook_allowed_hosts)
        resolve(target)
    except HostUnresolved:
        pass
    except UrlRefused as exc:
        raise BadRequest(str(exc), param="url", code="invalid_url") from None
    return url


@router.post("", summary="Create a webhook endpoint", responses=ok(WebhookEndpointWithSecret))
def create_endpoint(
    body: EndpointCreate, caller: ProjectDep, session: SessionDep, settings: SettingsDep
) -> JSONResponse:
    endpoint = webhook.create_endpoint(
        session,
        caller.project_id,
        name=body.name,
        url=_checked_url(settings, body.url),
        event_types=body.event_types,
    )
    return JSONResponse(endpoint_object(endpoint, secret=endpoint.signing_secret))


@router.get("", summary="List webhook endpoints, newest first", responses=ok(WebhookEndpointList))
def list_endpoints(
    caller: ProjectDep, session: SessionDep, after: After = None, limit: Limit = 20
) -> JSONResponse:
    cursor = cursor_row(
        after, lambda id_: webhook.get_endpoint(session, caller.project_id, id_), "No such webhook endpoint"
    )
    rows = webhook.list_endpoints(session, caller.project_id, limit=limit + 1, after=cursor)
    return JSONResponse(list_page(rows, limit, endpoint_object))


@router.get(
    "/{webhook_endpoint_id}",
    summary="Retrieve a webhook endpoint",
    responses={**ok(WebhookEndpointObject), **NOT_FOUND},
)
def retrieve_endpoint(
    webhook_endpoint_id: EndpointId, caller: ProjectDep, session: SessionDep
) -> JSONResponse:
    return JSONResponse(endpoint_object(_endpoint(session, caller, webhook_endpoint_id)))


@router.post(
    "/{webhook_endpoint_id}",
    summary="Update a webhook endpoint",
    responses={**ok(WebhookEndpointObject), **NOT_FOUND},
)
def update_endpoint(
    webhook_endpoint_id: EndpointId,
    body: EndpointUpdate,
    caller: ProjectDep,
    session: SessionDep,
    settings: SettingsDep,
) -> JSONResponse:
    endpoint = _endpoint(session, caller, webhook_endpoint_id)
    url = _checked_url(settings, body.url) if body.url is not None else None
    webhook.update_endpoint(session, endpoint, name=body.name, url=url, event_types=body.event_types)
    return JSONResponse(endpoint_object(endpoint))


@router.delete(
    "/{webhook_endpoint_id}",
    summary="Delete a webhook endpoint (its pending deliveries are dropped)",
    responses={**ok(WebhookEndpointDeleted), **NOT_FOUND},
)
def delete_endpoint(webhook_endpoint_id: EndpointId, caller: ProjectDep, session: SessionDep) -> JSONResponse:
    endpoint = _endpoint(session, caller, webhook_endpoint_id)
    webhook.delete_endpoint(session, endpoint)
    return JSONResponse({"id": webhook_endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True})


@router.post(
    "/{webhook_endpoint_id}/rotate_secret",
    summary="Rotate an endpoint's signing secret (the new one is shown only here)",
    responses={**ok(WebhookEndpointWithSecret), **NOT_FOUND},
)
def rotate_secret(
    webhook_endpoint_id: EndpointId,
    caller: ProjectDep,
    session: SessionDep,
    body: RotateSecret | None = None,
) -> JSONResponse:
    endpoint = _endpoint(session, caller, webhook_endpoint_id)
    keep = body.keep_old_secret_active_for_24_hours if body is not None else False
    secret = webhook.rotate_secret(session, endpoint, keep_old_for_24_hours=keep)
    return JSONResponse(endpoint_object(endpoint, secret=secret))


@router.post(
    "/{webhook_endpoint_id}/test",
    summary="Send a sample event to the endpoint now and answer what it answered",
    responses={**ok(WebhookEndpointTestResult), **NOT_FOUND},
)
def test_endpoint(
    webhook_endpoint_id: EndpointId,
    body: TestRequest,
    caller: ProjectDep,
    session: SessionDep,
    settings: SettingsDep,
) -> JSONResponse:
    """One attempt, no retries; it is listed with the endpoint's deliveries. An endpoint that
    cannot be reached (or a URL the policy now refuses) is a 400 saying why."""
    endpoint = _endpoint(session, caller, webhook_endpoint_id)
    now = utcnow()
    event_id, delivery_id = webhook.new_event_id(), webhook.new_delivery_id()
    sample = {"id": "ftjob-" + "0" * 24}
    payload = webhook.event_body(event_id, body.event_type, now, sample)
    result = attempt(settings, endpoint.url, delivery_id, payload, webhook.signing_secrets(endpoint, now))
    webhook.add_sent_delivery(
        session,
        endpoint,
        delivery_id=delivery_id,
        event_id=event_id,
        event_type=body.event_type,
        body=payload,
        attempted_at=now,
        status_code=result.status_code,
        error=result.error,
    )
    if result.status_code is None:
        # The delivery row must be kept, so this answer is not an exception (that would roll it back).
        error = BadRequest(
            f"The test event could not be delivered: {result.error}", param="url", code="webhook_unreachable"
        )
        return JSONResponse(error.body(), status_code=400, headers={"x-should-retry": "false"})
    return JSONResponse(
        {
            "object": "webhook_endpoint.test",
            "webhook_endpoint_id": endpoint.id,
            "event_type": body.event_type,
            "status_code": result.status_code,
            "success": True,
        }
    )


@router.get(
    "/{webhook_endpoint_id}/deliveries",
    summary="List an endpoint's deliveries, newest first (Tuneforge extension)",
    responses={**ok(WebhookDeliveryList), **NOT_FOUND},
)
def list_deliveries(
    webhook_endpoint_id: EndpointId,
    caller: ProjectDep,
    session: SessionDep,
    after: After = None,
    limit: Limit = 20,
) -> JSONResponse:
    endpoint = _endpoint(session, caller, webhook_endpoint_id)
    cursor = cursor_row(
        after,
        lambda id_: webhook.get_delivery(session, endpoint.id, id_),
        f"No such delivery of endpoint {endpoint.id}",
    )
    rows = webhook.list_deliveries(session, endpoint.id, limit=limit + 1, after=cursor)
    return JSONResponse(list_page(rows, limit, delivery_object))


@event_types_router.get("", summary="List the webhook event types", responses=ok(WebhookEventTypeList))
def list_event_types(caller: ProjectDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": list(webhook.JOB_EVENT_TYPES)})
