"""``/v1/models``: upload (raw body or multipart), describe, list, delete (``upload_blueprint``)."""

from __future__ import annotations

from service.api.uploads import upload_blueprint
from service.uploads.records import MODEL

bp = upload_blueprint(MODEL, __name__)
