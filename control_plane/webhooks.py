"""Webhooks of async requests: which URLs may be called, how a delivery is signed and retried.

A submission may name a `webhook` URL and the statuses to be told of (`webhook_events_filter`,
default the three final ones). A trigger in the database turns each such status change into a
delivery row in the same transaction (db/migrations/0013_uploads_webhooks.sql), so nothing a
request did is lost to a crash; `webhook_sender.py` sends them. Pure functions only here.

Only hosts in `MLCP_WEBHOOK_ALLOW` can be called (default loopback only), so a key cannot make
the service reach an arbitrary host (SSRF). Deliveries are signed the Standard Webhooks way:
`webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">` under the key's secret (`GET /v1/webhooks/default/secret`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from control_plane.errors import InvalidWebhook

EVENTS = ("pending", "processing", "success", "failed", "cancelled")
DEFAULT_EVENTS = ("success", "failed", "cancelled")
MAX_URL_CHARS = 2048
SECRET_PREFIX = "whsec_"
# The longest wait between two attempts of one delivery.
MAX_BACKOFF_S = 300.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowList:
    """Host names matched exactly (case-insensitive) and networks matched against IP literals."""

    names: frozenset[str]
    networks: tuple[Network, ...]


def parse_allow(text: str) -> AllowList:
    """`MLCP_WEBHOOK_ALLOW`: comma-separated names, addresses and CIDR blocks."""
    names: set[str] = set()
    networks: list[Network] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry)
    return AllowList(frozenset(names), tuple(networks))


def url_problem(url: object, allow: AllowList) -> str | None:
    """Why `url` may not be a webhook target, or None when it may."""
    if not isinstance(url, str) or not 1 <= len(url) <= MAX_URL_CHARS:
        return f"must be an http(s) URL of at most {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http(s) URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if any(ch.isspace() for ch in url):
        return "must not contain whitespace"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host.lower().rstrip(".") in allow.names:
            return None
        return f"names host {host!r}, which MLCP_WEBHOOK_ALLOW does not allow"
    if any(address in net for net in allow.networks) or host.lower() in allow.names:
        return None
    return f"names host {host}, which MLCP_WEBHOOK_ALLOW does not allow"


def check_webhook(url: object, events: object, allow: AllowList) -> tuple[str, list[str]]:
    """A submission's `webhook` and `webhook_events_filter`, checked (422 invalid_webhook)."""
    problem = url_problem(url, allow)
    if problem is not None:
        raise InvalidWebhook(f"'webhook' {problem}")
    assert isinstance(url, str)
    if events is None:
        return url, list(DEFAULT_EVENTS)
    if (
        not isinstance(events, list)
        or not events
        or any(not isinstance(e, str) or e not in EVENTS for e in events)
    ):
        raise InvalidWebhook(
            f"'webhook_events_filter' must be a non-empty list of {', '.join(EVENTS)}"
        )
    return url, sorted(set(events), key=EVENTS.index)


def new_secret() -> str:
    """A signing secret, as Standard Webhooks writes them: whsec_ and 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value of one delivery."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def backoff_s(attempts: int, base_s: float) -> float:
    """The wait before the next attempt after `attempts` failed ones: base, 2x, 4x, ... capped."""
    return float(min(base_s * 2 ** max(attempts - 1, 0), MAX_BACKOFF_S))


def outcome(attempts: int, max_attempts: int, ok: bool) -> str:
    """A delivery's state after an attempt: delivered, pending (to retry) or failed for good."""
    if ok:
        return "delivered"
    return "failed" if attempts >= max_attempts else "pending"
