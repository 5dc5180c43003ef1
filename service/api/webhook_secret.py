"""``/v1/webhook-secret``: the calling tenant's webhook signing secret."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service.api.context import services, space
from service.errors import NotFound
from service.webhooks import tenant_secret

bp = Blueprint("webhook_secret", __name__, url_prefix="/v1/webhook-secret")


@bp.get("")
def webhook_secret() -> Response:
    """The secret this tenant's webhooks are signed with (``service.webhooks.tenant_secret``:
    derived from the operator's secret and the tenant's name; another tenant's differs), for
    its receivers to verify ``X-EdgePress-Signature`` with. 404 when webhooks are off."""
    operator = services().settings.webhook_secret
    if operator is None:
        raise NotFound("webhooks are not enabled on this server", code="webhooks_not_enabled")
    tenant = space().tenant
    return jsonify({"tenant": tenant,
                    "secret": tenant_secret(operator.get_secret_value(), tenant)})
