"""Callback address checks: IPv6 forms that embed an IPv4 address are judged by that address."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pydantic import SecretStr

from service import webhooks
from service.config import Settings


def settings(**over: object) -> Settings:
    return Settings(webhook_secret=SecretStr("s"), **over)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "host",
    [
        "[::127.0.0.1]",  # IPv4-compatible loopback
        "[::10.0.0.1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[::ffff:169.254.169.254]",
        "[64:ff9b::7f00:1]",  # NAT64 well-known prefix -> 127.0.0.1
        "[64:ff9b::a9fe:a9fe]",  # -> 169.254.169.254 (cloud metadata)
        "[64:ff9b::c0a8:101]",  # -> 192.168.1.1
        "[64:ff9b:1::8.8.8.8]",  # local-use NAT64
        "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
        "[2001:0:4136:e378:8000:63bf:f5ff:fffe]",  # Teredo, client 10.0.0.1
        "[::1]",
        "[fe80::1]",
        "127.0.0.1",
        "10.1.2.3",
    ],
)
def test_non_public_addresses_are_refused(host: str) -> None:
    with pytest.raises(webhooks.CallbackRefused):
        webhooks.check_callback_url(f"https://{host}/hook", settings())


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "[2001:4860:4860::8888]", "[64:ff9b::808:808]", "[::ffff:8.8.8.8]"]
)
def test_public_addresses_pass(host: str) -> None:
    webhooks.check_callback_url(f"https://{host}/hook", settings())


def test_embedded_loopback_follows_the_loopback_setting() -> None:
    allow = settings(webhook_allow_loopback_http=True)
    webhooks.check_callback_url("https://[::ffff:127.0.0.1]/hook", allow)
    webhooks.check_callback_url("https://[64:ff9b::7f00:1]/hook", allow)
    # An allow-listed network admits what it holds, embedded or not.
    listed = settings(webhook_allow_hosts="10.0.0.0/8")
    webhooks.check_callback_url("https://[64:ff9b::a00:1]/hook", listed)


# -- delivery against real loopback receivers -----------------------------------------------------



def _loopback(**over: object) -> Settings:
    return settings(webhook_allow_loopback_http=True, **over)


@pytest.fixture
def receiver() -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], str]]:
    """A raw TCP receiver on loopback answering each request with ``handler(conn, request)``;
    the URL to post to. Real sockets, so drips and endless bodies are what the client sees."""
    servers: list[socket.socket] = []
    received: list[bytes] = []

    def start(handler: Callable[[socket.socket, bytes], None], host: str = "127.0.0.1") -> str:
        srv = socket.socket()
        srv.bind((host, 0))
        srv.listen()
        servers.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(30)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = int(next(
                        (line.split(b":")[1] for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length")), b"0"))
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    received.append(data)
                    with contextlib.suppress(OSError):
                        handler(conn, head + b"\r\n\r\n" + rest)

        threading.Thread(target=serve, daemon=True).start()
        return f"http://{host}:{srv.getsockname()[1]}/hook"

    start.received = received  # type: ignore[attr-defined]
    yield start  # type: ignore[misc]
    for srv in servers:
        srv.close()


def _ok(conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")


def test_one_tenants_signature_does_not_verify_for_another(receiver) -> None:  # type: ignore[no-untyped-def]
    got: list[bytes] = []

    def keep(conn: socket.socket, request: bytes) -> None:
        got.append(request)
        _ok(conn, request)

    url = receiver(keep)
    assert webhooks.deliver(url, {"event": "job.succeeded"}, _loopback(), "acme") == 204
    head, _, body = got[0].partition(b"\r\n\r\n")
    signature = next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                     if line.lower().startswith(b"x-edgepress-signature"))
    acme, globex = (webhooks.tenant_secret("s", t) for t in ("acme", "globex"))
    assert acme != globex
    assert webhooks.verify(acme, body, signature)
    assert not webhooks.verify(globex, body, signature)  # globex cannot be sent acme's
    assert not webhooks.verify("s", body, signature)  # nor is it the operator's secret
    assert f"Host: 127.0.0.1:{url.split(':')[2].split('/')[0]}".encode() in head


def test_a_receiver_that_drips_its_answer_is_cut_at_the_deadline(
    receiver, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setattr(webhooks, "DELIVERY_SECONDS", 1.5)

    def drip(conn: socket.socket, request: bytes) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
            conn.sendall(bytes([byte]))
            time.sleep(0.2)  # each read returns within any per-read timeout

    url = receiver(drip)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        webhooks.deliver(url, {"event": "job.failed"}, _loopback(), "acme")
    assert time.monotonic() - started < 3.0


def test_a_receiver_whose_body_never_ends_costs_a_bounded_read(
    receiver, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setattr(webhooks, "DELIVERY_SECONDS", 5.0)
    sent = [0]

    def endless(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        while True:
            conn.sendall(chunk)
            sent[0] += len(chunk)

    url = receiver(endless)
    started = time.monotonic()
    assert webhooks.deliver(url, {"event": "job.failed"}, _loopback(), "acme") == 200
    assert time.monotonic() - started < 3.0  # did not wait for the end (there is none)


def test_the_delivery_connects_to_the_address_that_was_checked(
    receiver, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    # A rebinding name: the first answer is the (allowed) receiver on 127.0.0.1, any later
    # one an address the check would refuse. The stand-in is the attacker's resolver only;
    # the receivers are real.
    honest = receiver(_ok)
    port = int(honest.split(":")[2].split("/")[0])
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host, *args, **kw):  # type: ignore[no-untyped-def]
        if host != "hooks.rebind.test":
            return real(host, *args, **kw)
        ip = "127.0.0.1" if not answers else "10.0.0.1"
        answers.append(ip)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://hooks.rebind.test:{port}/hook"
    allow = _loopback(webhook_allow_hosts="hooks.rebind.test")
    assert webhooks.deliver(url, {"event": "job.succeeded"}, allow, "acme") == 204
    assert answers == ["127.0.0.1"]  # resolved once: nothing left to rebind
    assert b"Host: hooks.rebind.test:" in receiver.received[-1]
