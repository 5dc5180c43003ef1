"""S3-compatible object storage (AWS S3, MinIO, SeaweedFS) through boto3.

Everything EdgePress keeps lives here: uploads, job records, artifacts. Job records use
conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to update) so that two
writers cannot overwrite each other. Transient errors are retried by botocore's standard retry
mode; when the store stays unreachable callers get ``Unavailable`` (503 + Retry-After).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.config import Settings
from service.errors import PreconditionFailed, Unavailable

log = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict", "409"}


@dataclass(frozen=True)
class StoredObject:
    key: str
    body: bytes
    etag: str
    metadata: dict[str, str]


class ObjectStore(Protocol):
    """What the rest of the service needs from object storage."""

    def get(self, key: str) -> StoredObject | None: ...
    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = ...,
        if_none_match: bool = ...,
        if_match: str | None = ...,
        metadata: dict[str, str] | None = ...,
    ) -> str: ...
    def upload_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str = ...,
        metadata: dict[str, str] | None = ...,
    ) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list_keys(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> list[str]: ...
    def presign_get(self, key: str, *, filename: str | None = None) -> str: ...
    def presign_post(self, key: str, *, max_bytes: int, ttl: int) -> dict[str, Any]: ...
    def ping(self) -> None: ...


class S3ObjectStore:
    """``ObjectStore`` on an S3 bucket; all keys are relative to ``settings.s3_prefix``."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", presign_ttl: int = 300) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._presign_ttl = presign_ttl
        self._transfer = TransferConfig(
            multipart_threshold=16 * 1024**2, multipart_chunksize=16 * 1024**2, max_concurrency=4
        )

    # -- keys ------------------------------------------------------------------------------
    def _k(self, key: str) -> str:
        return self.prefix + key

    def scoped(self, sub_prefix: str) -> S3ObjectStore:
        """The same bucket and client under ``prefix + sub_prefix`` (a tenant's space)."""
        return S3ObjectStore(
            self._client, self.bucket, self.prefix + sub_prefix.strip("/"), self._presign_ttl
        )

    def list_prefixes(self, prefix: str) -> list[str]:
        """The "directories" directly under ``prefix`` (names without slashes)."""
        out: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix), Delimiter="/"):
                for item in page.get("CommonPrefixes", []):
                    out.append(item["Prefix"][len(self._k(prefix)) :].rstrip("/"))
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc
        return out

    def total_bytes(self, prefix: str) -> int:
        """Sum of object sizes under ``prefix`` (quota accounting)."""
        total = 0
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
                total += sum(int(item.get("Size", 0)) for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc
        return total

    # -- primitives --------------------------------------------------------------------------
    def get(self, key: str) -> StoredObject | None:
        """The object at ``key`` (whole body in memory: use for small records only)."""
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._k(key))
            body = resp["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        return StoredObject(key, body, resp.get("ETag", ""), resp.get("Metadata", {}))

    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/json",
        if_none_match: bool = False,
        if_match: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Write ``body``; with ``if_none_match`` only if absent, with ``if_match`` only if the
        current ETag matches. Raises ``PreconditionFailed`` when the condition does not hold.
        Returns the new ETag."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._k(key),
            "Body": body,
            "ContentType": content_type,
        }
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        if metadata:
            kwargs["Metadata"] = metadata
        try:
            resp = self._client.put_object(**kwargs)
        except ClientError as exc:
            if _error_code(exc) in _PRECONDITION:
                raise PreconditionFailed(f"object {key!r} changed concurrently") from exc
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        return str(resp.get("ETag", ""))

    def upload_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Stream a local file to ``key`` (multipart above 16 MiB; constant memory)."""
        extra: dict[str, Any] = {"ContentType": content_type}
        if metadata:
            extra["Metadata"] = metadata
        try:
            self._client.upload_file(
                str(path), self.bucket, self._k(key), ExtraArgs=extra, Config=self._transfer
            )
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc

    def upload_stream(self, key: str, stream: BinaryIO, *, content_type: str) -> None:
        try:
            self._client.upload_fileobj(
                stream,
                self.bucket,
                self._k(key),
                ExtraArgs={"ContentType": content_type},
                Config=self._transfer,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc

    def download_file(self, key: str, path: Path) -> None:
        try:
            self._client.download_file(self.bucket, self._k(key), str(path), Config=self._transfer)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                raise FileNotFoundError(key) from exc
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return False
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        return True

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many."""
        count = 0
        for key in self.iter_keys(prefix):
            self.delete(key)
            count += 1
        return count

    def iter_keys(self, prefix: str) -> Iterator[str]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                resp = self._client.list_objects_v2(**kwargs)
            except (ClientError, BotoCoreError) as exc:
                raise _unavailable(exc) from exc
            for item in resp.get("Contents", []):
                yield item["Key"][len(self.prefix) :]
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def list_keys(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Keys under ``prefix`` in ascending order, strictly after ``start_after``."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._k(prefix),
            "MaxKeys": max(1, min(limit, 1000)),
        }
        if start_after:
            kwargs["StartAfter"] = self._k(start_after)
        try:
            resp = self._client.list_objects_v2(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc
        return [item["Key"][len(self.prefix) :] for item in resp.get("Contents", [])]

    def presign_get(self, key: str, *, filename: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._k(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return str(
            self._client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=self._presign_ttl
            )
        )

    def presign_post(self, key: str, *, max_bytes: int, ttl: int) -> dict[str, Any]:
        """A browser-style presigned POST for ``key`` whose policy caps the size."""
        try:
            return dict(
                self._client.generate_presigned_post(
                    self.bucket, self._k(key),
                    Conditions=[["content-length-range", 1, max_bytes]], ExpiresIn=ttl,
                )
            )
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc

    def ping(self) -> None:
        """Raise ``Unavailable`` unless the bucket answers."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (local stacks and tests)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND | {"403"}:
                raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise _unavailable(exc) from exc


def _error_code(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code if code and code not in {"None"} and not code.isdigit() else status or code


def _unavailable(exc: Exception) -> Unavailable:
    # The message stays generic: botocore's text can carry endpoint URLs and key names.
    log.warning("object store error: %s", exc)
    return Unavailable("the object store is unavailable; retry later", code="store_unavailable")


def make_client(settings: Settings) -> Any:
    """A boto3 S3 client from settings: path-style addressing, standard retries, timeouts."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=(
            settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        ),
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 4},
            connect_timeout=settings.s3_connect_timeout,
            read_timeout=settings.s3_read_timeout,
        ),
    )


def make_store(settings: Settings) -> S3ObjectStore:
    return S3ObjectStore(
        make_client(settings), settings.s3_bucket, settings.s3_prefix, settings.presign_ttl_seconds
    )
