"""Uploaded models and datasets: content-addressed records on the object store."""

from service.uploads.store import DatasetRecord, ModelRecord, UploadStore

__all__ = ["DatasetRecord", "ModelRecord", "UploadStore"]
