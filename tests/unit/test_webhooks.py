"""Callback address checks: IPv6 forms that embed an IPv4 address are judged by that address."""

from __future__ import annotations

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
