"""``/v1/datasets``: ``.npz`` calibration / evaluation samples keyed by model input name, read
with ``allow_pickle=False`` only and validated against a model's inputs when a job uses them;
upload, describe, list, delete as for models (``upload_blueprint``)."""

from __future__ import annotations

from service.api.uploads import upload_blueprint
from service.uploads.records import DATASET

bp = upload_blueprint(DATASET, __name__)
