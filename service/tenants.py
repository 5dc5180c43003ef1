"""Tenants: every tenant's data lives under ``tenants/<name>/`` in the object store."""

from __future__ import annotations

import re

DEFAULT_TENANT = "default"
# A tenant name, whole: always use ``fullmatch`` (``match`` with "$" accepts a trailing "\n").
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


def tenant_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/"
