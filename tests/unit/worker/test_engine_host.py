"""The engine process under supervision: run to its outcome, with progress, stage ends and
announced artifacts reported on the way, or stopped by its caller (time limits, crashes and
memory exhaustion: tests/e2e/test_faults.py); the engine reads no file of the worker's source cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from service.config import Settings, limits_for
from service.worker import isolation
from service.worker.engine_host import run_engine
from tests.models import write_mlp


def _spec(workdir: Path) -> Path:
    (workdir / "input").mkdir(parents=True)  # as the runner lays it out
    model = write_mlp(workdir / "input" / "m.onnx", inputs=128, hidden=256)
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({
        "workdir": str(workdir), "model_path": str(model), "dataset_path": None,
        "recipe": [{"pass": "quantize_dynamic"}], "device": "host", "constraints": {},
        "limits": {"eval_samples": 2, "latency_runs": 2, "latency_warmup": 0}}))
    return spec


def _run(workdir: Path, tick, **limits):  # type: ignore[no-untyped-def]
    stages: list[str] = []
    announced: list[str] = []
    outcome = run_engine(
        "job_test", workdir, dataclasses.replace(limits_for(Settings()), **limits),
        huge_pages=True, every=0.0, tick=tick,  # as the worker starts it (one per process)
        on_artifact=lambda name, path: announced.append(name),
        on_stage=lambda stage, seconds: stages.append(stage),
    )
    return outcome, stages, announced


def test_runs_to_its_outcome_reporting_progress(tmp_path: Path) -> None:
    _spec(tmp_path / "w")
    ticks: list[tuple[str, float]] = []
    outcome, stages, announced = _run(tmp_path / "w", lambda s, f: ticks.append((s, f)) or True)
    assert outcome.get("ok") is True, outcome
    assert set(outcome["artifacts"]) >= {"model.onnx", "report.json", "report.html"}
    assert "model.onnx" in announced and len(stages) >= 2 and ticks
    memory = outcome["summary"]["memory"]  # the engine process's own peak, as measured
    assert outcome["summary"]["peak_rss_mb"] == memory["peak_rss_mb"] > 10
    assert memory["peak_rss_anon_mb"] > 0 and memory["peak_rss_file_mb"] >= 0
    assert memory["peak_rss_mb"] >= memory["peak_rss_anon_mb"] - 1
    # VmData counts private writable memory whether resident or not: RssAnon less the stack
    assert memory["peak_vm_data_mb"] >= memory["peak_rss_anon_mb"] - 16  # less the stack
    assert all("data" in v for v in memory["by_stage_mb"].values())
    # no language-model probe ran: no child peak is claimed (RUSAGE_CHILDREN's is apart)
    assert memory["children_max_rss_mb"] == 0.0 and "children_rusage_max_rss_mb" in memory
    assert "VmHWM" in memory["measured"] and "RLIMIT_DATA" in memory["measured"]


def test_peak_memory_tells_heap_from_mapped_files(tmp_path: Path) -> None:
    import numpy as np

    from service.worker.engine_host import PeakMemory

    data = tmp_path / "weights.bin"
    np.ones(64 * 2**20 // 4, np.float32).tofile(data)
    import mmap

    with PeakMemory(interval=0.01) as memory:
        base = memory.status()
        # 96 MiB of fresh anonymous pages, touched (not malloc's: it may reuse freed memory)
        heap = mmap.mmap(-1, 96 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        np.frombuffer(heap, np.uint8)[:] = 1
        mapped = np.memmap(data, np.float32, mode="r")
        assert float(mapped.sum()) == mapped.size  # 64 MiB read through the mapping: file
        peak = memory.report()  # reads the current status too: both are resident now
        del mapped
        heap.close()
    assert peak["peak_rss_anon_mb"] - base["RssAnon"] / 1024 >= 80
    assert peak["peak_rss_file_mb"] - base["RssFile"] / 1024 >= 50
    assert peak["peak_rss_mb"] >= peak["peak_rss_anon_mb"]


def test_the_caller_stops_it(tmp_path: Path) -> None:
    _spec(tmp_path / "w")
    outcome, _, _ = _run(tmp_path / "w", lambda s, f: False)
    assert outcome == {"stopped": True}



def test_output_is_bounded_per_job_not_per_file(tmp_path: Path) -> None:
    # What one job writes, file by file; then a limit above every file but below their sum:
    # the same job fails output_too_large.
    _spec(tmp_path / "a")
    outcome, _, _ = _run(tmp_path / "a", lambda s, f: True)
    assert outcome.get("ok") is True, outcome
    sizes = [p.stat().st_size for p in (tmp_path / "a").rglob("*")
             if p.is_file() and "input" not in p.relative_to(tmp_path / "a").parts]
    limit = max(sizes) + 1
    assert limit < sum(sizes)
    _spec(tmp_path / "b")
    outcome, _, _ = _run(tmp_path / "b", lambda s, f: True, job_output_bytes=limit)
    assert outcome.get("ok") is False and outcome["error"]["code"] == "output_too_large", outcome


@pytest.mark.skipif(isolation.landlock_abi(isolation._libc()) < 1, reason="no Landlock here")
def test_the_engine_cannot_read_the_source_cache_next_to_its_workdir() -> None:
    # Laid out as JobRunner lays out its scratch dir; the engine keeps this process's user (as
    # in the k8s pods), so only its Landlock ruleset stands between it and the cache entry.
    scratch = Path(tempfile.mkdtemp(prefix="edgepress-scratch-"))
    try:
        cache = scratch / "edgepress-source-cache"
        cache.mkdir()
        entry = write_mlp(cache / ("0" * 64), inputs=128, hidden=256)  # another tenant's model
        spec = _spec(scratch / "mine")
        own = json.loads(spec.read_text())
        shutil.copy(entry, own["model_path"])  # the same bytes, copied in: readable
        outcome, _, _ = _run(scratch / "mine", lambda s, f: True)
        assert outcome.get("ok") is True, outcome
        assert outcome["isolation"]["filesystem"].startswith("landlock abi ")

        spec = _spec(scratch / "probe")
        spec.write_text(json.dumps({**json.loads(spec.read_text()), "model_path": str(entry)}))
        outcome, _, _ = _run(scratch / "probe", lambda s, f: True)
        assert outcome.get("ok") is False and outcome["error"]["code"] == "internal_error"
        stderr = (scratch / "probe" / "engine.stderr").read_text()
        assert f"PermissionError: [Errno 13] Permission denied: '{entry}'" in stderr
        assert os.access(entry, os.R_OK)  # to this process's user: only the ruleset refused it
    finally:
        shutil.rmtree(scratch)
