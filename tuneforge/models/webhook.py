"""Webhook endpoints and their deliveries: tables and queries.

A delivery is an outbox row: `enqueue_event` writes one per subscribed endpoint in the same
transaction as the change it reports (a job reaching a final status: `transition` in
tuneforge/models/job.py calls it), so an event is never lost with a crash and never sent for a
change that rolled back. The sender (tuneforge/worker/webhooks.py) takes due rows with
`claim_due_deliveries`, a conditional UPDATE that pushes the row's `next_attempt_at` past the
attempt's time limit (a sender that dies mid-attempt leaves the row to be taken again later),
and records each attempt with `record_attempt`.

The delivery's id is the `webhook-id` header, the same on every attempt; its body is fixed when
the row is written, and each attempt signs it afresh with the endpoint's secret of the moment.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneforge.db import Base, UtcDateTime, utcnow
from tuneforge.models.ids import new_id

JobEventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
JOB_EVENT_TYPES: tuple[str, ...] = get_args(JobEventType)
"""The event types Tuneforge sends (OpenAI's fine-tuning events)."""

SECRET_PREFIX = "whsec_"
OLD_SECRET_GRACE = timedelta(hours=24)


class DeliveryStatus:
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_project_id_created_at", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256))
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[str]] = mapped_column(JSON)
    signing_secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_id_created_at", "endpoint_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


# --- secrets --------------------------------------------------------------------------------------


def new_signing_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    """What an endpoint shows of its secret after creation: the prefix and the last four characters."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def signing_secrets(endpoint: WebhookEndpoint, now: datetime | None = None) -> list[str]:
    """The secrets an attempt signs with: the current one, and the previous one while a rotation
    that kept it is less than 24 hours old."""
    now = now or utcnow()
    found = [endpoint.signing_secret]
    if (
        endpoint.previous_secret
        and endpoint.previous_secret_expires_at is not None
        and endpoint.previous_secret_expires_at > now
    ):
        found.append(endpoint.previous_secret)
    return found


# --- endpoints ------------------------------------------------------------------------------------


def new_endpoint_id() -> str:
    return new_id("we_")


def create_endpoint(
    session: Session, project_id: str, *, name: str, url: str, event_types: Sequence[str]
) -> WebhookEndpoint:
    now = utcnow()
    endpoint = WebhookEndpoint(
        id=new_endpoint_id(),
        project_id=project_id,
        name=name,
        url=url,
        event_types=list(dict.fromkeys(event_types)),
        signing_secret=new_signing_secret(),
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == endpoint_id, WebhookEndpoint.project_id == project_id
        )
    )


def list_endpoints(
    session: Session, project_id: str, *, limit: int, after: WebhookEndpoint | None = None
) -> list[WebhookEndpoint]:
    """Newest first, by (created_at, id)."""
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id)
    if after is not None:
        stmt = stmt.where(
            (WebhookEndpoint.created_at < after.created_at)
            | ((WebhookEndpoint.created_at == after.created_at) & (WebhookEndpoint.id < after.id))
        )
    stmt = stmt.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc()).limit(limit)
    return list(session.scalars(stmt))


def update_endpoint(
    session: Session,
    endpoint: WebhookEndpoint,
    *,
    name: str | None = None,
    url: str | None = None,
    event_types: Sequence[str] | None = None,
) -> WebhookEndpoint:
    """Sets what is given; `updated_at` moves only when something changes."""
    changes: dict[str, Any] = {}
    if name is not None and name != endpoint.name:
        changes["name"] = name
    if url is not None and url != endpoint.url:
        changes["url"] = url
    if event_types is not None and list(dict.fromkeys(event_types)) != endpoint.event_types:
        changes["event_types"] = list(dict.fromkeys(event_types))
    if changes:
        for key, value in changes.items():
            setattr(endpoint, key, value)
        endpoint.updated_at = utcnow()
        session.flush()
    return endpoint


def rotate_secret(session: Session, endpoint: WebhookEndpoint, *, keep_old_for_24_hours: bool) -> str:
    """A new secret for the endpoint (returned); the old one keeps signing for 24 hours when asked."""
    now = utcnow()
    endpoint.previous_secret = endpoint.signing_secret if keep_old_for_24_hours else None
    endpoint.previous_secret_expires_at = now + OLD_SECRET_GRACE if keep_old_for_24_hours else None
    endpoint.signing_secret = new_signing_secret()
    endpoint.updated_at = now
    session.flush()
    return endpoint.signing_secret


def delete_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """Deletes the endpoint and its deliveries (pending ones are never sent)."""
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
    session.delete(endpoint)
    session.flush()


# --- deliveries -----------------------------------------------------------------------------------


def new_event_id() -> str:
    return new_id("evt_")


def new_delivery_id() -> str:
    return new_id("wh_")


def event_body(event_id: str, event_type: str, created_at: datetime, data: dict[str, Any]) -> str:
    """OpenAI's webhook payload, as the bytes every attempt sends."""
    payload = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": int(created_at.timestamp()),
        "data": data,
    }
    return json.dumps(payload, separators=(",", ":"))


def enqueue_event(session: Session, project_id: str, event_type: str, data: dict[str, Any]) -> list[str]:
    """The outbox: one pending delivery of the event to each of the project's endpoints that
    subscribe to `event_type`, in the caller's transaction. Returns the deliveries' ids."""
    rows = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.event_types).where(
            WebhookEndpoint.project_id == project_id
        )
    ).all()
    targets = [endpoint_id for endpoint_id, types in rows if event_type in (types or [])]
    if not targets:
        return []
    now = utcnow()
    event_id = new_event_id()
    body = event_body(event_id, event_type, now, data)
    deliveries = [
        WebhookDelivery(
            id=new_delivery_id(),
            endpoint_id=endpoint_id,
            event_id=event_id,
            event_type=event_type,
            body=body,
            status=DeliveryStatus.PENDING,
            attempts=0,
            created_at=now,
            next_attempt_at=now,
        )
        for endpoint_id in targets
    ]
    session.add_all(deliveries)
    session.flush()
    return [d.id for d in deliveries]


def add_sent_delivery(
    session: Session,
    endpoint: WebhookEndpoint,
    *,
    delivery_id: str,
    event_id: str,
    event_type: str,
    body: str,
    attempted_at: datetime,
    status_code: int | None,
    error: str | None,
) -> WebhookDelivery:
    """Records a delivery made at once with no retries (a test event)."""
    delivered = status_code is not None and 200 <= status_code < 300
    delivery = WebhookDelivery(
        id=delivery_id,
        endpoint_id=endpoint.id,
        event_id=event_id,
        event_type=event_type,
        body=body,
        status=DeliveryStatus.DELIVERED if delivered else DeliveryStatus.FAILED,
        attempts=1,
        created_at=attempted_at,
        next_attempt_at=None,
        last_attempt_at=attempted_at,
        last_status_code=status_code,
        last_error=error,
        delivered_at=attempted_at if delivered else None,
    )
    session.add(delivery)
    session.flush()
    return delivery


@dataclass(frozen=True)
class DueDelivery:
    """What one attempt needs, read when the sender takes the delivery."""

    id: str
    endpoint_id: str
    url: str
    body: str
    secrets: list[str]
    attempts: int
    created_at: datetime


def claim_due_deliveries(
    session: Session, now: datetime, *, hold_for: timedelta, limit: int
) -> list[DueDelivery]:
    """Pending deliveries whose time has come, oldest due first, each taken by a conditional
    UPDATE that moves its `next_attempt_at` to `now + hold_for`: a concurrent sender cannot take
    the same row, and one that dies mid-attempt leaves it to be taken again after `hold_for`."""
    due = (WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at <= now)
    candidates = session.scalars(
        select(WebhookDelivery.id).where(*due).order_by(WebhookDelivery.next_attempt_at).limit(limit)
    ).all()
    taken: list[str] = []
    for delivery_id in candidates:
        result = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, *due)
            .values(next_attempt_at=now + hold_for)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            taken.append(delivery_id)
    if not taken:
        return []
    rows = session.execute(
        select(WebhookDelivery, WebhookEndpoint)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id.in_(taken))
    ).all()
    return [
        DueDelivery(
            id=delivery.id,
            endpoint_id=endpoint.id,
            url=endpoint.url,
            body=delivery.body,
            secrets=signing_secrets(endpoint, now),
            attempts=delivery.attempts,
            created_at=delivery.created_at,
        )
        for delivery, endpoint in rows
    ]


def record_attempt(
    session: Session,
    delivery_id: str,
    *,
    attempted_at: datetime,
    status_code: int | None,
    error: str | None,
    retry_at: datetime | None,
) -> str | None:
    """Records one attempt: delivered on a 2xx answer; else pending until `retry_at`, or failed
    when there is none. Returns the delivery's new status (None if the row is gone)."""
    delivered = status_code is not None and 200 <= status_code < 300
    if delivered:
        status = DeliveryStatus.DELIVERED
    else:
        status = DeliveryStatus.PENDING if retry_at is not None else DeliveryStatus.FAILED
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING)
        .values(
            status=status,
            attempts=WebhookDelivery.attempts + 1,
            last_attempt_at=attempted_at,
            last_status_code=status_code,
            last_error=error,
            next_attempt_at=retry_at if status == DeliveryStatus.PENDING else None,
            delivered_at=attempted_at if delivered else None,
        )
        .execution_options(synchronize_session=False)
    )
    return status if result.rowcount else None  # type: ignore[attr-defined]


def get_delivery(session: Session, endpoint_id: str, delivery_id: str) -> WebhookDelivery | None:
    return session.scalar(
        select(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint_id
        )
    )


def list_deliveries(
    session: Session, endpoint_id: str, *, limit: int, after: WebhookDelivery | None = None
) -> list[WebhookDelivery]:
    """Newest first, by (created_at, id)."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if after is not None:
        stmt = stmt.where(
            (WebhookDelivery.created_at < after.created_at)
            | ((WebhookDelivery.created_at == after.created_at) & (WebhookDelivery.id < after.id))
        )
    stmt = stmt.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit)
    return list(session.scalars(stmt))
