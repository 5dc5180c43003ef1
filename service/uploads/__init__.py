"""Uploaded models and datasets: content-addressed records on the object store.

``service.uploads.records`` (the records and the table of upload kinds) needs pydantic only;
``UploadStore`` (boto3 underneath) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from service.uploads.records import DatasetRecord, ModelRecord


def __getattr__(name: str) -> Any:
    if name == "UploadStore":
        from service.uploads.store import UploadStore

        return UploadStore
    raise AttributeError(name)


__all__ = ["DatasetRecord", "ModelRecord", "UploadStore"]
