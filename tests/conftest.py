"""Shared fixtures: the real local stack (SeaweedFS S3, Redis, gunicorn API, Celery worker).

Isolation: each test session starts its own Redis on a free port and its own API and worker
on free ports, and uses its own key prefix in the ``edgepress-tests`` bucket. The S3 server is
the SeaweedFS on 127.0.0.1:8333 when one runs, otherwise the session starts one and stops it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.devstack import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    LocalStack,
    StackState,
    free_port,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that starts the live stack without the ``stack`` marker: ``-m "not
    stack"`` must never start the stack, and the marker must say which tests need it."""
    unmarked = [
        item.nodeid
        for item in items
        if "live_stack" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("stack") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests use the live stack without @pytest.mark.stack: " + ", ".join(unmarked)
        )


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    """A running stack for this test session (started once, stopped at the end)."""
    directory = tmp_path_factory.mktemp("stack")
    stack = LocalStack(
        directory,
        api_port=free_port(),
        worker_metrics_port=free_port(),
        bucket="edgepress-tests",
        prefix=f"run-{uuid.uuid4().hex[:12]}",
        own_redis=True,
        extra_env={
            # Short fault-handling windows so the fault tests finish quickly.
            "EDGEPRESS_JOB_STALE_SECONDS": "12",
            "EDGEPRESS_JOB_HEARTBEAT_SECONDS": "2",
            "EDGEPRESS_RECONCILE_INTERVAL_SECONDS": "3",
            "EDGEPRESS_JOB_QUEUED_REQUEUE_SECONDS": "20",
            "EDGEPRESS_PROGRESS_INTERVAL_SECONDS": "0.5",
            "EDGEPRESS_AUTH": "open",
            "EDGEPRESS_S3_ACCESS_KEY": os.environ.get("EDGEPRESS_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY),
            "EDGEPRESS_S3_SECRET_KEY": os.environ.get("EDGEPRESS_S3_SECRET_KEY", DEFAULT_SECRET_KEY),
        },
    )
    state = stack.up()
    try:
        yield state
    finally:
        stack.stop_started()


@pytest.fixture(scope="session")
def stack_settings(live_stack: StackState) -> Settings:
    """Settings pointing at the live stack (for in-process clients of the same store/broker)."""
    env = live_stack.env
    return Settings(
        s3_endpoint_url=env["EDGEPRESS_S3_ENDPOINT_URL"],
        s3_bucket=env["EDGEPRESS_S3_BUCKET"],
        s3_prefix=env["EDGEPRESS_S3_PREFIX"],
        s3_access_key=env["EDGEPRESS_S3_ACCESS_KEY"],
        s3_secret_key=env["EDGEPRESS_S3_SECRET_KEY"],  # type: ignore[arg-type]
        broker_url=env["EDGEPRESS_BROKER_URL"],
        scratch_dir=env["EDGEPRESS_SCRATCH_DIR"],
        auth="open",  # the API fails closed; tests that need keys configure them
    )


@pytest.fixture
def isolated_settings(stack_settings: Settings) -> Settings:
    """Like ``stack_settings`` but with a fresh key prefix (an empty store) and no queue
    consumer: for tests of the store and the API in this process."""
    return stack_settings.model_copy(
        update={
            "s3_prefix": f"{stack_settings.s3_prefix}-iso-{uuid.uuid4().hex[:8]}",
            "queue_name": f"edgepress.test.{uuid.uuid4().hex[:8]}",
        }
    )


@pytest.fixture
def app(isolated_settings: Settings):  # type: ignore[no-untyped-def]
    from service.api import create_app

    application = create_app(isolated_settings)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture(scope="session")
def mlp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float MLP crafted with onnx.helper whose weights dominate the file (~2 MB)."""
    from tests.models import write_mlp

    return write_mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


@pytest.fixture(scope="session")
def byte_lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The trained byte-level Llama decoder with its KV cache (``tests.llm``), built once into
    pytest's cache (keyed by its source and the torch/transformers versions), else a fresh
    session directory."""
    import hashlib

    from tests import llm

    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return llm.byte_llama(tmp_path_factory.mktemp("llm"))
    import torch
    import transformers

    key = hashlib.sha256(Path(llm.__file__).read_bytes() + torch.__version__.encode()
                         + transformers.__version__.encode()).hexdigest()[:12]
    return llm.byte_llama(Path(cache.mkdir(f"edgepress_llm_{key}")))
