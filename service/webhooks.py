"""Webhooks: a signed POST to the job's ``callback_url`` on every terminal state.

Signature: ``X-EdgePress-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``
(plus ``X-EdgePress-Timestamp``), so receivers can verify origin and reject replays. Only
``https`` URLs are accepted (``http`` to loopback when the operator allows it for tests and
local stacks), and never private, loopback, link-local or otherwise non-global addresses
unless allow-listed: the host is resolved and checked at submission and again before each
delivery. Redirects are not followed. Delivery is retried with exponential backoff.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from urllib.parse import urlsplit

from service.config import Settings
from service.engine.errors import EngineError


class CallbackRefused(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("invalid_callback_url", message)


# IPv6 prefixes that carry an IPv4 address in their last 32 bits: the IPv4-compatible
# ``::a.b.c.d`` (deprecated, still routed by some stacks) and NAT64's well-known prefix
# (RFC 6052), through which a gateway reaches whatever IPv4 address is embedded.
_EMBEDS_IPV4_LOW32 = (ipaddress.ip_network("::/96"), ipaddress.ip_network("64:ff9b::/96"))
# Local-use NAT64 (RFC 8215): the embedded address is not even at a fixed place.
_NEVER = (ipaddress.ip_network("64:ff9b:1::/48"),)


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, compatible, NAT64, 6to4, Teredo)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if int(addr) > 1 and any(addr in net for net in _EMBEDS_IPV4_LOW32):  # not :: or ::1
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _allowed(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str, settings: Settings) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        if any(addr in net for net in _NEVER):
            return False
        # Python's is_global judges these by their IPv6 prefix (``::127.0.0.1`` and
        # ``64:ff9b::7f00:1`` count as global): judge the IPv4 address they reach instead.
        inner = _embedded_ipv4(addr)
        if inner is not None:
            return _allowed(inner, host, settings)
    entries = [e.strip() for e in settings.webhook_allow_hosts.split(",") if e.strip()]
    for entry in entries:
        if entry == host:
            return True
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    if addr.is_loopback:
        return settings.webhook_allow_loopback_http
    return addr.is_global


def check_callback_url(url: str, settings: Settings) -> None:
    """Raise ``CallbackRefused`` unless ``url`` may receive webhooks right now."""
    if settings.webhook_secret is None:
        raise CallbackRefused("webhooks are not enabled on this server (no signing secret set)")
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("https", "http") or not host:
        raise CallbackRefused("callback_url must be an absolute https URL")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url must not carry credentials")
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise CallbackRefused(f"callback host {host!r} does not resolve") from None
    addrs = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    for addr in addrs:
        if not _allowed(addr, host, settings):
            raise CallbackRefused(
                f"callback host {host!r} resolves to a non-public address; refused"
            )
    if parts.scheme == "http" and not (
        settings.webhook_allow_loopback_http and all(a.is_loopback for a in addrs)
    ):
        raise CallbackRefused("callback_url must use https")


def sign(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-EdgePress-Timestamp": str(ts), "X-EdgePress-Signature": f"t={ts},v1={mac}"}


def verify(secret: str, body: bytes, header: str, tolerance: int = 300) -> bool:
    """Receiver side (documented for users; used by the tests)."""
    try:
        fields = dict(item.split("=", 1) for item in header.split(","))
        ts = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - ts) > tolerance:
        return False
    expected = sign(secret, body, ts)["X-EdgePress-Signature"]
    return hmac.compare_digest(expected, header)


def deliver(url: str, payload: dict, settings: Settings) -> int:
    """POST once; returns the HTTP status. Raises on refusal or network errors."""
    import requests

    check_callback_url(url, settings)
    assert settings.webhook_secret is not None  # checked above
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "EdgePress-Webhook/1"}
    headers.update(sign(settings.webhook_secret.get_secret_value(), body))
    resp = requests.post(url, data=body, headers=headers, timeout=10, allow_redirects=False)
    return resp.status_code
