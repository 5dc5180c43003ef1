"""Jobs survive faults, each caused for real on a stack of this module's own.

Worker SIGKILLed mid-job (retried on a new worker, never run twice at once), a job that kills
its worker every time (failed worker_lost after the attempts limit), the engine crashing
(segfault) or exhausting memory (precise failure, worker lives on), time limits (timeout),
a cancelled running job (stops within seconds), and the broker flushed (the reconciler
re-enqueues from the store).
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from service.devstack import LocalStack, free_port
from tests.e2e.client import Api
from tests.models import write_mlp

pytestmark = [pytest.mark.stack, pytest.mark.slow]

FAST_FAULTS = {
    "EDGEPRESS_JOB_STALE_SECONDS": "6",
    "EDGEPRESS_JOB_HEARTBEAT_SECONDS": "1",
    "EDGEPRESS_RECONCILE_INTERVAL_SECONDS": "2",
    "EDGEPRESS_JOB_QUEUED_REQUEUE_SECONDS": "8",
    "EDGEPRESS_PROGRESS_INTERVAL_SECONDS": "0.5",
    "EDGEPRESS_JOB_MAX_ATTEMPTS": "2",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    s = LocalStack(
        tmp_path_factory.mktemp("fault-stack"), api_port=free_port(),
        worker_metrics_port=free_port(), bucket="edgepress-tests",
        prefix=f"faults-{uuid.uuid4().hex[:10]}", own_redis=True, extra_env=FAST_FAULTS,
    )
    state = s.up()
    s.state = state  # type: ignore[attr-defined]
    yield s
    s.stop_started()


@pytest.fixture(scope="module")
def api(stack) -> Api:  # type: ignore[no-untyped-def]
    return Api(stack.state.api_url)


@pytest.fixture(scope="module")
def long_job_inputs(api, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A model + dataset whose job trains for a set time (distill) and then compresses."""
    d = tmp_path_factory.mktemp("faults")
    model = api.upload_model(write_mlp(d / "mlp.onnx", inputs=256, hidden=1024))
    data = d / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32))
    dataset = api.upload_dataset(data)
    return model["id"], dataset["id"]


def long_recipe(seconds: float) -> list[dict]:
    return [
        {"pass": "distill", "budget": {"max_seconds": seconds, "max_steps": 100000}},
        {"pass": "quantize_dynamic"},
    ]


def wait_state(api: Api, job_id: str, predicate, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.request("GET", f"/v1/jobs/{job_id}").json()
        if predicate(job):
            return dict(job)
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached the expected state; last: {job}")


def engine_pids(stack) -> list[int]:  # type: ignore[no-untyped-def]
    """Live engine processes of this stack (each writes engine.pid into its job's workdir)."""
    import os

    pids = []
    for pid_file in Path(stack.dir, "scratch").glob("*/engine.pid"):
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else ""
        if "State:\tZ" not in status:
            pids.append(pid)
    return pids


def test_worker_killed_mid_job_is_retried_once(stack, api, long_job_inputs) -> None:  # type: ignore[no-untyped-def]
    model_id, dataset_id = long_job_inputs
    job = api.submit(model_id=model_id, dataset_id=dataset_id, recipe=long_recipe(8))
    wait_state(api, job["id"], lambda j: j["state"] == "running" and j["stage"].startswith("pass:"))
    stack.kill_worker(signal.SIGKILL)
    stack.start_worker()
    stack.wait_worker()
    done = api.wait(job["id"], timeout=180)
    assert done["state"] == "succeeded", done.get("error")
    assert done["attempts"] == 2
    assert done["result"]["size_ratio"] > 3


def test_poison_job_fails_worker_lost(stack, api, long_job_inputs) -> None:  # type: ignore[no-untyped-def]
    model_id, dataset_id = long_job_inputs
    job = api.submit(model_id=model_id, dataset_id=dataset_id, recipe=long_recipe(30))
    for attempt in (1, 2):
        wait_state(api, job["id"], lambda j, a=attempt: j["state"] == "running" and j["attempts"] == a,
                   timeout=90)
        stack.kill_worker(signal.SIGKILL)
        stack.start_worker()
        stack.wait_worker()
    done = api.wait(job["id"], timeout=120)
    assert done["state"] == "failed"
    assert done["error"]["code"] == "worker_lost"
    assert done["attempts"] == 2


def test_engine_segfault_fails_job_and_worker_lives(stack, api, long_job_inputs) -> None:  # type: ignore[no-untyped-def]
    model_id, dataset_id = long_job_inputs
    job = api.submit(model_id=model_id, dataset_id=dataset_id, recipe=long_recipe(20))
    wait_state(api, job["id"], lambda j: j["stage"].startswith("pass:"))
    pids = engine_pids(stack)
    assert len(pids) == 1
    import os

    os.kill(pids[0], signal.SIGSEGV)  # what a crash inside ONNX Runtime looks like to us
    done = api.wait(job["id"], timeout=60)
    assert done["state"] == "failed" and done["error"]["code"] == "engine_crashed"
    # The same worker takes the next job.
    follow = api.submit(model_id=model_id, recipe=[{"pass": "quantize_dynamic"}])
    assert api.wait(follow["id"], timeout=90)["state"] == "succeeded"


def test_cancel_running_job_stops_within_seconds(stack, api, long_job_inputs) -> None:  # type: ignore[no-untyped-def]
    model_id, dataset_id = long_job_inputs
    job = api.submit(model_id=model_id, dataset_id=dataset_id, recipe=long_recipe(60))
    wait_state(api, job["id"], lambda j: j["stage"].startswith("pass:"))
    resp = api.request("POST", f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202
    asked = time.monotonic()
    done = api.wait(job["id"], timeout=30)
    assert done["state"] == "cancelled"
    assert time.monotonic() - asked < 10
    assert engine_pids(stack) == []
    follow = api.submit(model_id=model_id, recipe=[{"pass": "quantize_dynamic"}])
    assert api.wait(follow["id"], timeout=90)["state"] == "succeeded"


def test_broker_flushed_jobs_are_reenqueued(stack, api, long_job_inputs) -> None:  # type: ignore[no-untyped-def]
    model_id, _ = long_job_inputs
    stack.kill_worker(signal.SIGTERM)
    job = api.submit(model_id=model_id, recipe=[{"pass": "quantize_dynamic"}])
    redis.Redis.from_url(stack.state.broker_url).flushdb()  # the message is gone
    stack.start_worker()
    stack.wait_worker()
    done = api.wait(job["id"], timeout=90)
    assert done["state"] == "succeeded"
    assert done["attempts"] == 1  # re-enqueued, run once


def test_time_limit(stack, api, long_job_inputs) -> None:  # type: ignore[no-untyped-def]
    model_id, dataset_id = long_job_inputs
    stack.kill_worker(signal.SIGTERM)
    stack.start_worker({"EDGEPRESS_JOB_SOFT_TIME_LIMIT": "5", "EDGEPRESS_JOB_TIME_LIMIT": "10"})
    stack.wait_worker()
    try:
        slow = api.submit(model_id=model_id, dataset_id=dataset_id, recipe=long_recipe(60))
        done = api.wait(slow["id"], timeout=60)
        assert done["state"] == "failed" and done["error"]["code"] == "timeout", done["error"]
    finally:
        stack.kill_worker(signal.SIGTERM)
        stack.start_worker()
        stack.wait_worker()


def test_memory_limit(stack, api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack.kill_worker(signal.SIGTERM)
    stack.start_worker({"EDGEPRESS_JOB_MEMORY_LIMIT_MB": "400"})
    stack.wait_worker()
    try:
        big = api.upload_model(write_mlp(tmp_path / "big.onnx", inputs=4096, hidden=6144))
        job = api.submit(model_id=big["id"], recipe=[{"pass": "quantize_dynamic"}])
        done = api.wait(job["id"], timeout=60)
        assert done["state"] == "failed" and done["error"]["code"] == "out_of_memory", done["error"]
        assert "400 MB" in done["error"]["message"] or "memory" in done["error"]["message"]
    finally:
        stack.kill_worker(signal.SIGTERM)
        stack.start_worker()
        stack.wait_worker()
