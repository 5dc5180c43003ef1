"""Object store access. ``ObjectStore`` is the small interface; ``S3ObjectStore`` the real one."""

from service.storage.s3 import ObjectStore, S3ObjectStore, StoredObject, make_store

__all__ = ["ObjectStore", "S3ObjectStore", "StoredObject", "make_store"]
