"""Settings: the one place that reads the environment (``EDGEPRESS_*``, and the
``PROMETHEUS_MULTIPROC_DIR`` that prometheus_client reads too); ``limits_for``: every limit
the service enforces, derived from them in one place.

Everything else receives a ``Settings`` instance (gunicorn's config file too). The README's
configuration table is written from the field descriptions here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.limits import EngineLimits

# The disk a model needs on a worker, in multiples of its size: the upload (source cache), the
# archive extracted, the compressed output and the scratch files of evaluation.
MODEL_DISK_FACTOR = 4
_ARCHIVE_SLACK = 64 * 1024 * 1024  # an archive's headers and graph on top of the weights


def disk_sized_model_bytes(directory: str | None) -> int:
    """The default largest model: the free space of ``directory`` (default: the temporary
    directory) over ``MODEL_DISK_FACTOR``."""
    import shutil
    import tempfile

    free = shutil.disk_usage(directory or tempfile.gettempdir()).free
    return max(1024, free // MODEL_DISK_FACTOR)


class Settings(BaseSettings):
    """EdgePress settings, read from ``EDGEPRESS_<FIELD>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="EDGEPRESS_", frozen=True, extra="ignore")

    # Object store (AWS S3, MinIO, SeaweedFS ...).
    s3_endpoint_url: str | None = Field(
        default="http://127.0.0.1:8333",
        description="S3 endpoint; empty for AWS S3 itself.",
    )
    s3_bucket: str = Field(default="edgepress", description="Bucket holding everything.")
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key: str | None = Field(default=None, description="S3 access key id.")
    s3_secret_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_prefix: str = Field(
        default="",
        description="Key prefix inside the bucket (isolates deployments or test runs).",
    )
    s3_connect_timeout: float = Field(default=3.0, description="Seconds to connect to S3.")
    s3_read_timeout: float = Field(default=30.0, description="Seconds to wait for S3 reads.")
    presign_ttl_seconds: int = Field(
        default=300, ge=10, le=7 * 24 * 3600, description="Lifetime of artifact download URLs."
    )

    # Broker.
    broker_url: str = Field(default="redis://127.0.0.1:6379/0", description="Celery broker URL.")
    queue_name: str = Field(default="edgepress.jobs", description="Celery queue for jobs.")

    # Requests and limits.
    max_model_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest model the service takes (graph + weights, external data "
        "included). Empty: sized by the worker's disk, the free space of the scratch directory "
        "divided by 4 (room for the upload, its extracted copy, the output and scratch files).",
    )
    max_upload_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest accepted model upload (413 beyond). Empty: the largest model "
        "(EDGEPRESS_MAX_MODEL_BYTES).",
    )
    external_data_inline_bytes: int = Field(
        default=512 * 1024**2,
        ge=0,
        description="An archive whose external data holds more bytes than this keeps its "
        "weights on disk (read tensor by tensor; only the streaming passes int4_weight_only "
        "rtn/gptq/awq and quantize_weight_only apply) instead of loading them into memory (a recipe "
        "job holds a few copies: keep it below EDGEPRESS_JOB_MEMORY_LIMIT_MB / 6); above "
        "2 GiB always.",
    )
    segment_weight_bytes: int | None = Field(
        default=None,
        ge=1,
        description="A job's float original whose external weights pass this many bytes is "
        "evaluated segment by segment (consecutive parts of its graph, each holding at most "
        "this many bytes of weights, one resident at a time). Empty: decided by "
        "EDGEPRESS_JOB_MEMORY_LIMIT_MB (segments of a fifth of it when the weights pass half).",
    )
    max_dataset_bytes: int = Field(
        default=512 * 1024**2, ge=1024, description="Largest accepted dataset upload."
    )
    max_json_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest body of any request but an upload (JSON bodies; 413 beyond).",
    )
    max_json_depth: int = Field(
        default=32, ge=2, le=256, description="Deepest nesting of a JSON body (400 beyond)."
    )
    inspect_memory_limit_mb: int = Field(
        default=3072,
        ge=128,
        description="Memory limit (private writable memory, RLIMIT_DATA) of a process "
        "inspecting an upload (API processes x EDGEPRESS_INSPECT_CONCURRENCY of them stay "
        "below the API pod's memory limit).",
    )
    inspect_concurrency: int = Field(
        default=1,
        ge=1,
        description="Uploads one API process inspects at once; beyond it 503 inspection_busy "
        "with Retry-After.",
    )
    inspect_timeout_seconds: int = Field(
        default=120, ge=1, description="CPU-seconds limit for inspecting one upload."
    )
    scratch_dir: str | None = Field(
        default=None, description="Local scratch directory for uploads and jobs (default: TMPDIR)."
    )

    # Jobs.
    job_soft_time_limit: int = Field(
        default=1800, ge=5, description="Seconds after which a job is asked to stop (timeout)."
    )
    job_time_limit: int = Field(
        default=1900, ge=10, description="Seconds after which a job's engine process is killed."
    )
    job_max_attempts: int = Field(
        default=3, ge=1, description="Deliveries of one job before it fails with worker_lost."
    )
    job_memory_limit_mb: int = Field(
        default=4096,
        ge=256,
        description="Memory of all of a job's engine processes together (auto's parallel "
        "candidates share it): their private writable memory (RLIMIT_DATA: heap, anonymous "
        "and private mappings, stacks); weights read from shared read-only mappings of model "
        "files (page cache) are not counted. Below the worker pod's memory limit.",
    )
    job_max_output_mb: int = Field(
        default=4096,
        ge=16,
        description="Most bytes a job's engine may write, all files together (and the "
        "largest single file).",
    )
    job_queued_requeue_seconds: int = Field(
        default=600, ge=5, description="A job queued this long is re-enqueued by the reconciler."
    )
    job_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often a running job's record is refreshed."
    )
    job_stale_seconds: float = Field(
        default=45.0, gt=0, description="A running job not refreshed this long lost its worker."
    )
    reconcile_interval_seconds: float = Field(
        default=15.0, gt=0, description="How often each worker looks for lost or stuck jobs."
    )
    engine_huge_pages: bool = Field(
        default=True,
        description="Back job engine processes' heap with transparent huge pages (glibc "
        "tunable; fewer page faults on big models).",
    )
    worker_source_cache_mb: int = Field(
        default=4096,
        ge=0,
        description="Local copies of uploaded models/datasets a worker keeps, by content, "
        "so that a model submitted again is not downloaded again (MB; 0: off).",
    )
    engine_uid: int | None = Field(
        default=65534,
        ge=1,
        description="Where the worker runs as root: the user a job's engine runs as (it must "
        "be able to read the interpreter and the code; else the engine keeps the worker's user "
        "and the job's summary says why). Empty: never change user.",
    )
    engine_gid: int = Field(default=65534, ge=1, description="The engine's group (with EDGEPRESS_ENGINE_UID).")
    progress_interval_seconds: float = Field(
        default=1.0, ge=0.0, description="Minimum seconds between progress writes to a job."
    )

    # Access. The API fails closed: it refuses to start without keys unless the operator says
    # EDGEPRESS_AUTH=open (the local stack and the tests), where everything belongs to tenant
    # "default"; with keys, every /v1 request needs "Authorization: Bearer <key>".
    auth: Literal["keys", "open"] = Field(
        default="keys",
        description='"keys": the API refuses to start without API keys; "open": no keys, '
        'every caller is tenant "default" (local stacks only).',
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description='API keys as "tenant:key,tenant:key" (hashed at start-up; prefer the file).',
    )
    api_keys_file: str | None = Field(
        default=None,
        description='JSON list of {"tenant", "name", "sha256"} (SHA-256 hex of each key).',
    )
    metrics_require_auth: bool = Field(
        default=False, description="Require an API key for /metrics too."
    )
    rate_limit_per_minute: int = Field(
        default=1200, ge=0, description="Requests per minute per API key (0: unlimited)."
    )
    quota_concurrent_jobs: int = Field(
        default=16, ge=0, description="Queued + running jobs per tenant (0: unlimited)."
    )
    quota_stored_bytes: int = Field(
        default=50 * 1024**3,
        ge=0,
        description="Bytes a tenant may store (0: unlimited): models, datasets, jobs' records and "
        "artifacts, idempotency records, presigned uploads (pending ones by their size limit).",
    )
    long_poll_max_seconds: float = Field(
        default=20.0,
        ge=0,
        le=120,
        description="Longest a job status request with `Prefer: wait=N` is held (0: never).",
    )
    long_poll_max_waiters: int = Field(
        default=4,
        ge=0,
        description="Status requests held at once per API process (each holds a thread); "
        "beyond it they are answered at once.",
    )
    idempotency_ttl_seconds: int = Field(
        default=24 * 3600, ge=60, description="How long an Idempotency-Key is remembered."
    )

    # Webhooks.
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Operator secret webhook signatures derive from: each tenant signs with "
        'HMAC-SHA256(secret, "edgepress-webhook:" + tenant) (GET /v1/webhook-secret); '
        "required for webhooks.",
    )
    webhook_allow_hosts: str = Field(
        default="",
        description="Comma-separated hosts/CIDRs allowed even if private (e.g. 10.0.0.0/8).",
    )
    webhook_allow_loopback_http: bool = Field(
        default=False, description="Allow http:// callbacks to loopback (tests, local stack)."
    )
    webhook_max_attempts: int = Field(default=6, ge=1, le=20, description="Delivery attempts.")

    # Processes.
    worker_metrics_port: int = Field(default=9808, description="Worker's Prometheus port.")
    worker_metrics_host: str = Field(default="0.0.0.0", description="Worker metrics bind address.")
    log_level: str = Field(default="INFO", description="Log level.")
    bind: str = Field(default="127.0.0.1:8080", description="API address (gunicorn bind).")
    api_workers: int = Field(default=2, ge=1, description="API processes (gunicorn workers).")
    api_threads: int = Field(
        default=8,
        ge=1,
        description="Threads per API process (gthread); a long-polled status request holds "
        "one (at most EDGEPRESS_LONG_POLL_MAX_WAITERS of them).",
    )
    api_timeout: int = Field(
        default=120, ge=1, description="Seconds of silence before gunicorn restarts an API process."
    )
    api_graceful_timeout: int = Field(
        default=30, ge=0, description="Seconds an API process gets to finish its requests on stop."
    )
    api_keepalive: int = Field(
        default=5, ge=0, description="Seconds an idle keep-alive connection stays open."
    )
    prometheus_multiproc_dir: str | None = Field(
        default=None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="An empty directory per process group for multiprocess metrics (no "
        "EDGEPRESS_ prefix: prometheus_client reads it too).",
    )

@dataclass(frozen=True)
class Limits:
    """Every limit the service enforces, from the operator's settings (``limits_for``)."""

    engine: EngineLimits  # the engine's input caps: the API's inspection and the worker alike
    upload_bytes: dict[str, int]  # largest upload by kind ("model", "dataset"); 413 beyond
    request_bytes: int  # Werkzeug refuses a larger body before reading it (multipart allowed)
    form_memory_bytes: int  # largest non-file multipart part kept in memory
    inspect_rlimits: dict[str, tuple[int, int]]  # (soft, hard) RLIMIT_* of upload inspection
    inspect_seconds: int  # wall clock for one inspection (CPU limit + slack)
    job_rlimits: dict[str, tuple[int, int]]  # (soft, hard) RLIMIT_* of a job's engine process
    job_output_bytes: int  # everything a job's engine writes, all files together
    job_soft_seconds: int  # the engine is asked to stop (timeout)
    job_hard_seconds: int  # the engine is killed
    task_soft_seconds: int  # Celery's backstop for the task body (download, upload, records)
    task_hard_seconds: int
    redelivery_seconds: int  # the broker's visibility timeout: longer than any job


def limits_for(settings: Settings, cpus: int | None = None) -> Limits:
    """The limits under ``settings`` (``cpus``: this machine's, scaling the engine's CPU-time
    limit, which counts every thread of the process)."""
    mib = 1024 * 1024
    cpu_seconds = settings.job_time_limit * max(1, cpus or os.cpu_count() or 1)
    model_bytes = settings.max_model_bytes or disk_sized_model_bytes(settings.scratch_dir)
    upload_bytes = settings.max_upload_bytes or model_bytes
    defaults = EngineLimits()
    return Limits(
        engine=EngineLimits(
            max_model_bytes=model_bytes,
            # An archive expands to its model, plus headers: never less than the model limit.
            max_uncompressed_bytes=max(defaults.max_uncompressed_bytes,
                                       model_bytes + _ARCHIVE_SLACK),
            max_dataset_bytes=settings.max_dataset_bytes,
            external_data_inline_bytes=settings.external_data_inline_bytes,
            segment_weight_bytes=settings.segment_weight_bytes,
        ),
        upload_bytes={"model": upload_bytes, "dataset": settings.max_dataset_bytes},
        request_bytes=max(upload_bytes, settings.max_dataset_bytes) + mib,
        form_memory_bytes=mib,
        inspect_rlimits={
            "RLIMIT_DATA": (settings.inspect_memory_limit_mb * mib,) * 2,
            "RLIMIT_CPU": (settings.inspect_timeout_seconds, settings.inspect_timeout_seconds + 2),
            "RLIMIT_CORE": (0, 0),
        },
        inspect_seconds=settings.inspect_timeout_seconds + 5,
        job_rlimits={
            # Private writable memory, not address space: a big model's weights are read
            # from shared read-only mappings of its files (page cache), which count against
            # RLIMIT_AS whether resident or not (``devices.host.memory_limit``).
            "RLIMIT_DATA": (settings.job_memory_limit_mb * mib,) * 2,
            # The hard limit a little later: SIGXCPU at the soft one, SIGKILL if ignored.
            "RLIMIT_CPU": (cpu_seconds, cpu_seconds + 5),
            "RLIMIT_FSIZE": (settings.job_max_output_mb * mib,) * 2,
            "RLIMIT_CORE": (0, 0),
        },
        job_output_bytes=settings.job_max_output_mb * mib,
        job_soft_seconds=settings.job_soft_time_limit,
        job_hard_seconds=settings.job_time_limit,
        task_soft_seconds=settings.job_time_limit + 120,
        task_hard_seconds=settings.job_time_limit + 180,
        redelivery_seconds=settings.job_time_limit + 600,
    )
