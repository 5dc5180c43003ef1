"""Scale-out on one machine: one API, one broker, three worker processes, a burst of jobs.

Every job runs exactly once (one claim each), all succeed, and the work is spread across the
workers. (Throughput 1 vs 3 workers is measured by scripts/bench_scaleout.py, not asserted.)
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from service.config import Settings
from service.devstack import LocalStack, free_port
from service.jobs.store import JobStore
from service.storage.s3 import make_store
from service.tenants import DEFAULT_TENANT, tenant_prefix
from tests.e2e.client import Api
from tests.models import write_mlp

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_burst_runs_each_job_once_across_three_workers(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path_factory.mktemp("scale-stack")
    stack = LocalStack(directory, api_port=free_port(), worker_metrics_port=free_port(),
                       bucket="edgepress-tests", prefix=f"scale-{uuid.uuid4().hex[:10]}", own_redis=True)
    state = stack.up()
    try:
        for name in ("worker-2", "worker-3"):
            stack.start_worker(name=name)
        api = Api(state.api_url)
        models = [
            api.upload_model(write_mlp(directory / f"m{i}.onnx", inputs=256, hidden=512, seed=i))
            for i in range(3)
        ]
        jobs = [
            api.submit(model_id=models[i % 3]["id"], recipe=[{"pass": "quantize_dynamic"}])
            for i in range(12)
        ]
        finished = [api.wait(j["id"], timeout=300) for j in jobs]
        assert [f["state"] for f in finished] == ["succeeded"] * len(jobs)
        assert all(f["attempts"] == 1 for f in finished)  # claimed once, run once
        env = state.env
        store = make_store(Settings(
            s3_endpoint_url=env["EDGEPRESS_S3_ENDPOINT_URL"], s3_bucket=env["EDGEPRESS_S3_BUCKET"],
            s3_prefix=env["EDGEPRESS_S3_PREFIX"], s3_access_key=env["EDGEPRESS_S3_ACCESS_KEY"],
            s3_secret_key=env["EDGEPRESS_S3_SECRET_KEY"],  # type: ignore[arg-type]
        ))
        records = JobStore(store.scoped(tenant_prefix(DEFAULT_TENANT)))
        per_worker = Counter(records.get(j["id"]).worker for j in jobs)  # host:pid of the runner
        assert len(per_worker) >= 2, f"all jobs ran on one worker process: {per_worker}"
    finally:
        stack.stop_started()
