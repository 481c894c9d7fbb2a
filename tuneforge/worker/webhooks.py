"""The webhook sender: works through the deliveries outbox (tuneforge/models/webhook.py).

It runs as a periodic task of the beat process (`tuneforge beat`, queue `control`, every
`webhook_send_every_seconds`). All its state is in the database: a restart of the API, of a
worker, of the beat process or of the broker loses nothing (a missed tick is followed by the
next one), and a delivery whose sender died mid-attempt is taken again once its hold runs out.

Each attempt is signed afresh the Standard Webhooks way (what `client.webhooks.unwrap` of the
official SDK verifies): `webhook-id` (the delivery's id, the same on every attempt),
`webhook-timestamp` (now) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
`id.timestamp.body` under the base64-decoded `whsec_` secret; two signatures while a rotated-out
secret is still honoured). A 2xx answer delivers; anything else, redirects included (never
followed), is retried after the next delay of `webhook_retry_seconds` stretched by up to 20%
jitter, until the schedule or `webhook_give_up_seconds` runs out: then the delivery has failed.

URLs: https to public addresses only, except hosts the administrator allows
(`webhook_allow_hosts`). The host is resolved at every attempt, every address it resolves to
must be public, and the request goes to the checked address (the name still goes in the Host
header and TLS server name), so DNS cannot point a delivery into the cluster between check and
connect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tuneforge import metrics
from tuneforge.config import Settings, get_settings
from tuneforge.db import make_engine, make_sessionmaker, session_scope, utcnow
from tuneforge.models import webhook
from tuneforge.worker.celery_app import SEND_WEBHOOKS_TASK, celery_app

log = logging.getLogger(__name__)

USER_AGENT = "Tuneforge-Webhooks/1"
BATCH = 50
PARALLEL_ATTEMPTS = 8
JITTER = 0.2
MAX_ERROR_CHARS = 500
MAX_ADDRESSES = 3
"""Addresses of one name an attempt tries, each only if the one before refused the connection."""

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    """A webhook URL the policy refuses; the message says why."""


class HostUnresolved(UrlRefused):
    """The URL's host does not resolve (now)."""


# --- the URL policy -------------------------------------------------------------------------------


def _is_allowed_host(host: str, allowed: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    try:
        address: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in allowed:
        if entry == host:
            return True
        if address is not None and "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _why_not_public(address: IpAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_multicast or address.is_unspecified or address.is_reserved or not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts, and whether the administrator allows its host."""

    url: str
    scheme: str
    host: str
    port: int
    allowed: bool


def check_url(url: str, allowed_hosts: Sequence[str]) -> Target:
    """Checks what can be checked without the network; raises UrlRefused."""
    if len(url) > 2048:
        raise UrlRefused("The URL is longer than 2048 characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"The URL is not valid: {exc}.") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in ("https", "http") or not host:
        raise UrlRefused("The URL must be an https:// URL with a host.")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("The URL must not carry a user name or password.")
    allowed = _is_allowed_host(host, allowed_hosts)
    if scheme != "https" and not allowed:
        raise UrlRefused("The URL must use https (plain http only to hosts the administrator allows).")
    if not allowed:
        try:
            literal: IpAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and (why := _why_not_public(literal)):
            raise UrlRefused(f"The URL's host is {why}; webhooks go to public addresses only.")
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            raise UrlRefused("The URL's host is a loopback name; webhooks go to public addresses only.")
    return Target(url, scheme, host, port or (443 if scheme == "https" else 80), allowed)


def resolve(target: Target) -> list[IpAddress]:
    """The addresses the host resolves to, each checked unless the host is allowed; raises
    UrlRefused (for a host that does not resolve, too)."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
        raise HostUnresolved(f"The URL's host does not resolve: {exc}.") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if not target.allowed:
        for address in addresses:
            if why := _why_not_public(address):
                raise UrlRefused(
                    f"The URL's host resolves to {address}, {why}; webhooks go to public addresses only."
                )
    return addresses


# --- signing and one attempt ----------------------------------------------------------------------


def sign(message_id: str, timestamp: int, body: str, secrets: Sequence[str]) -> str:
    """The `webhook-signature` header: a `v1,<base64>` signature per secret, space-separated."""
    signed = f"{message_id}.{timestamp}.{body}".encode()
    signatures = []
    for secret in secrets:
        key = (
            base64.b64decode(secret.removeprefix(webhook.SECRET_PREFIX))
            if secret.startswith(webhook.SECRET_PREFIX)
            else secret.encode()
        )
        digest = hmac.new(key, signed, hashlib.sha256).digest()
        signatures.append("v1," + base64.b64encode(digest).decode())
    return " ".join(signatures)


@dataclass(frozen=True)
class Attempt:
    """What one attempt got: an HTTP status code, or none and an error."""

    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _pinned_request(target: Target, address: IpAddress) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL with the checked address in place of the name, the Host header and the TLS
    server name that keep the request addressed to the name."""
    parts = urlsplit(target.url)
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{literal}:{target.port}"
    url = parts._replace(netloc=netloc).geturl()
    default_port = (target.scheme == "https" and target.port == 443) or (
        target.scheme == "http" and target.port == 80
    )
    host_header = target.host if default_port else f"{target.host}:{target.port}"
    return url, {"host": host_header}, {"sni_hostname": target.host}


def attempt(settings: Settings, url: str, message_id: str, body: str, secrets: Sequence[str]) -> Attempt:
    """One signed POST of `body` to `url`, the URL policy checked again first. Never raises."""
    try:
        target = check_url(url, settings.webhook_allowed_hosts)
        addresses = resolve(target)
    except UrlRefused as exc:
        return Attempt(None, str(exc))
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(message_id, timestamp, body, secrets),
    }
    routes: list[tuple[str, dict[str, str], dict[str, Any]]]
    try:
        ipaddress.ip_address(target.host)
        routes = [(url, {}, {})]
    except ValueError:  # a name: connect to an address just checked, the next one if it refuses
        routes = [_pinned_request(target, address) for address in addresses[:MAX_ADDRESSES]]
    error = "no address"
    for send_url, host_header, extensions in routes:
        try:
            with httpx.Client(
                timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
            ) as client:
                response = client.post(
                    send_url, content=body.encode(), headers={**headers, **host_header}, extensions=extensions
                )
            return Attempt(response.status_code, None if response.is_success else _answer(response))
        except httpx.ConnectError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            return Attempt(None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
    return Attempt(None, error[:MAX_ERROR_CHARS])


def _answer(response: httpx.Response) -> str:
    what = f"HTTP {response.status_code}"
    if response.is_redirect:
        return f"{what}: redirects are not followed"
    return what


# --- the retry schedule ---------------------------------------------------------------------------


def retry_at(settings: Settings, attempts_made: int, created_at: datetime, now: datetime) -> datetime | None:
    """When to try again after `attempts_made` failed attempts; None once the schedule or the
    give-up time has run out."""
    delays = settings.webhook_retry_delays
    if attempts_made > len(delays):
        return None
    delay = delays[attempts_made - 1] * (1 + random.uniform(0, JITTER))
    when = now + timedelta(seconds=delay)
    if when - created_at > timedelta(seconds=settings.webhook_give_up_seconds):
        return None
    return when


# --- the pass -------------------------------------------------------------------------------------


def _deliver(settings: Settings, sessions: sessionmaker[Session], due: webhook.DueDelivery) -> str | None:
    result = attempt(settings, due.url, due.id, due.body, due.secrets)
    now = utcnow()
    again = None if result.delivered else retry_at(settings, due.attempts + 1, due.created_at, now)
    with session_scope(sessions) as session:
        status = webhook.record_attempt(
            session,
            due.id,
            attempted_at=now,
            status_code=result.status_code,
            error=result.error,
            retry_at=again,
        )
    if result.delivered:
        metrics.record_webhook_delivery("delivered")
    else:
        metrics.record_webhook_delivery("gave_up" if status == webhook.DeliveryStatus.FAILED else "retry")
    if status == webhook.DeliveryStatus.FAILED:
        log.warning(
            "webhook delivery %s to endpoint %s failed for good after %d attempts: %s",
            due.id,
            due.endpoint_id,
            due.attempts + 1,
            result.error,
        )
    return status


def send_due(
    settings: Settings, sessions: sessionmaker[Session], *, budget_seconds: float | None = None
) -> dict[str, int]:
    """Sends the deliveries that are due, in batches, until none is left or `budget_seconds`
    (default: the send interval) has passed. Returns counts by outcome."""
    budget = settings.webhook_send_every_seconds if budget_seconds is None else budget_seconds
    hold = timedelta(seconds=settings.webhook_timeout_seconds + 60)
    started = time.monotonic()
    counts: dict[str, int] = {}
    while True:
        with session_scope(sessions) as session:
            due = webhook.claim_due_deliveries(session, utcnow(), hold_for=hold, limit=BATCH)
        if not due:
            break
        with ThreadPoolExecutor(max_workers=min(PARALLEL_ATTEMPTS, len(due))) as pool:
            for status in pool.map(lambda d: _deliver(settings, sessions, d), due):
                key = status or "gone"
                counts[key] = counts.get(key, 0) + 1
        if len(due) < BATCH or time.monotonic() - started > budget:
            break
    if counts:
        log.info("webhooks: %s", counts)
    return counts


@lru_cache(maxsize=1)
def _engine(database_url: str) -> Engine:
    """The beat process's engine for the sender, kept between ticks."""
    return make_engine(database_url, pool_size=2, max_overflow=PARALLEL_ATTEMPTS)


@celery_app.task(name=SEND_WEBHOOKS_TASK, ignore_result=True)
def send_webhooks_task() -> dict[str, int]:
    settings = get_settings()
    return send_due(settings, make_sessionmaker(_engine(settings.database_url)))
