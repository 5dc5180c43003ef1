"""Webhooks: a signed POST to the job's ``callback_url`` on every terminal state.

Signature: ``X-EdgePress-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``
(plus ``X-EdgePress-Timestamp``), so receivers can verify origin and reject replays. The
secret is the tenant's own, derived from the operator's ``EDGEPRESS_WEBHOOK_SECRET``:
``tenant_secret(operator_secret, tenant) = hex HMAC-SHA256(operator_secret, "edgepress-webhook:"
+ tenant)``, so one tenant cannot forge another's webhooks; a tenant reads its secret with
``GET /v1/webhook-secret``. Only ``https`` URLs are accepted (``http`` to loopback when the
operator allows it for tests and local stacks), and never private, loopback, link-local or
otherwise non-global addresses unless allow-listed: the host is resolved and checked at
submission and again before each delivery, and the delivery connects to the address checked
(one resolution, pinned; the Host header and TLS SNI/certificate check use the name). The
response is read for its status within ``DELIVERY_SECONDS`` in all and at most
``RESPONSE_BYTES`` (a receiver that drips or never ends its answer costs no more). Redirects
are not followed. Delivery is retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import threading
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


def check_callback_url(url: str, settings: Settings) -> list[str]:
    """Raise ``CallbackRefused`` unless ``url`` may receive webhooks right now; the addresses
    its host resolved to (all checked), for the delivery to connect to."""
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
    ordered = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for addr in addrs:
        if not _allowed(addr, host, settings):
            raise CallbackRefused(
                f"callback host {host!r} resolves to a non-public address; refused"
            )
    if parts.scheme == "http" and not (
        settings.webhook_allow_loopback_http and all(a.is_loopback for a in addrs)
    ):
        raise CallbackRefused("callback_url must use https")
    return ordered


def tenant_secret(operator_secret: str, tenant: str) -> str:
    """The webhook signing secret of ``tenant``: HMAC-SHA256 of its name under the operator's
    secret (hex). Nothing to store or rotate per tenant; a new operator secret rotates all."""
    return hmac.new(operator_secret.encode(), f"edgepress-webhook:{tenant}".encode(),
                    hashlib.sha256).hexdigest()


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


DELIVERY_SECONDS = 10.0  # connect, send, status line, headers and what is read of the body
RESPONSE_BYTES = 64 * 1024  # of the body: only the status matters


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to ``address`` (the one checked), speaks HTTP to ``host``."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to ``address``; TLS with SNI and the certificate checked for ``host``."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def deliver(url: str, payload: dict, settings: Settings, tenant: str) -> int:
    """POST once, signed with ``tenant``'s secret; returns the HTTP status. Raises on
    refusal, network errors, or a receiver that does not answer within ``DELIVERY_SECONDS``."""
    addresses = check_callback_url(url, settings)
    assert settings.webhook_secret is not None  # checked above
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", "User-Agent": "EdgePress-Webhook/1",
               "Host": parts.netloc.rsplit("@", 1)[-1]}
    secret = tenant_secret(settings.webhook_secret.get_secret_value(), tenant)
    headers.update(sign(secret, body))
    connection_type = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    conn = connection_type(host, port, addresses[0], DELIVERY_SECONDS)
    # One deadline for everything: per-read timeouts alone let a receiver that sends a byte
    # now and then hold the delivery forever; at the deadline the socket is shut down.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(DELIVERY_SECONDS, expire)
    timer.start()
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(RESPONSE_BYTES)  # a little of the body, never all of an endless one
        return resp.status
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError(f"the receiver did not answer within {DELIVERY_SECONDS} s") from None
        raise
    finally:
        timer.cancel()
        conn.close()
