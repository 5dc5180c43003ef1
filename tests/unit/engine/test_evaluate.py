"""Evaluation: generated inputs, fidelity per output (state outputs included), latency, accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.devices import get_device, host_profile
from service.engine.evaluate import (
    compare_latency,
    compare_output,
    dataset_feeds,
    decide,
    evaluate_candidate,
    generate_feeds,
    latency_thread_counts,
    make_session,
    measure_latency,
    rotation,
    rounds_per_count,
)
from service.engine.inputs import DEFAULT_DYNAMIC_DIM
from service.engine.limits import EngineLimits
from tests import crafted

FAST = EngineLimits(eval_samples=4, latency_runs=3, latency_warmup=1)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def test_generated_feeds_follow_the_signature_and_are_deterministic() -> None:
    model = crafted.dynamic_dims()
    feeds = generate_feeds(model, 3)
    again = generate_feeds(model, 3)
    assert len(feeds) == 3
    ids = feeds[0]["ids"]
    assert ids.shape == (1, DEFAULT_DYNAMIC_DIM) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 100  # valid embedding rows
    assert len(np.unique(np.concatenate([f["ids"].ravel() for f in feeds]))) > 2
    for a, b in zip(feeds, again, strict=True):
        np.testing.assert_array_equal(a["ids"], b["ids"])
    feeds = generate_feeds(crafted.constant_weights_opset11(), 1)
    assert feeds[0]["x"].shape == (1, 1, 8, 8) and feeds[0]["x"].dtype == np.float32


def test_dataset_feeds_split_along_batch() -> None:
    model = crafted.mlp()
    data = {"x": np.arange(10 * 64, dtype=np.float32).reshape(10, 64)}
    feeds, labels = dataset_feeds(model, data, np.arange(10), 4)
    assert len(feeds) == 4 and feeds[1]["x"].shape == (1, 64)
    np.testing.assert_array_equal(feeds[2]["x"], data["x"][2:3])
    assert labels is not None and [int(lbl[0]) for lbl in labels] == [0, 1, 2, 3]


def test_compare_output_metrics() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((1, 10)).astype(np.float32) for _ in range(8)]
    same = compare_output(ref, ref)
    assert same["cosine"] == 1.0 and same["sqnr_db"] == 200.0
    assert same["max_abs_error"] == 0.0 and same["top1_agreement"] == 1.0
    noisy = [r + 0.01 * rng.standard_normal(r.shape).astype(np.float32) for r in ref]
    m = compare_output(ref, noisy)
    assert 0.999 < m["cosine"] < 1.0 and 30 < m["sqnr_db"] < 50
    assert 0 < m["max_abs_error"] < 0.1
    flipped = compare_output(ref, [-r for r in ref])
    assert flipped["cosine"] == -1.0 and flipped["top1_agreement"] < 0.5
    broken = [r.copy() for r in ref]
    broken[3][0, 0] = np.nan
    b = compare_output(ref, broken)
    assert b["finite"] is False and b["cosine"] is None
    state = [rng.standard_normal((1, 1, 32)).astype(np.float32) for _ in range(2)]
    assert compare_output(state, state)["top1_agreement"] is None  # not classifier-like


def _two_output_model(state_weight: np.ndarray) -> onnx.ModelProto:
    """y = x @ W (classifier head) and state = tanh(x @ R) (a recurrent-like state output)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 5)).astype(np.float32)
    g = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("MatMul", ["x", "r"], ["s0"]),
         h.make_node("Tanh", ["s0"], ["s1"]), h.make_node("Unsqueeze", ["s1", "ax"], ["state"])],
        "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 5]),
         h.make_tensor_value_info("state", T.FLOAT, [1, "N", 8])],
        [nh.from_array(w, "w"), nh.from_array(state_weight, "r"),
         nh.from_array(np.array([0], np.int64), "ax")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_a_broken_state_output_shows_although_the_main_output_is_right(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    r = rng.standard_normal((16, 8)).astype(np.float32)
    original = _two_output_model(r)
    candidate = _two_output_model(rng.standard_normal((16, 8)).astype(np.float32))
    a, b = _save(original, tmp_path / "a.onnx"), _save(candidate, tmp_path / "b.onnx")
    feeds = generate_feeds(original, 4)
    labels = [np.array([0]), np.array([1]), np.array([2]), np.array([3])]
    result = evaluate_candidate(a, b, feeds, labels=labels, limits=FAST)
    fid = result["fidelity"]
    assert fid["y"]["cosine"] == 1.0 and fid["y"]["top1_agreement"] == 1.0
    assert fid["state"]["cosine"] < 0.9
    assert result["min_cosine"] == fid["state"]["cosine"]
    assert result["accuracy"]["output"] == "y"
    assert result["accuracy"]["before"] == result["accuracy"]["after"]
    assert result["size"]["bytes_before"] == a.stat().st_size
    assert result["params"]["before"] == 16 * 5 + 16 * 8  # int64 axes are no parameter
    lat = result["latency"]
    assert lat["before_ms"] > 0 and lat["after_ms"] > 0 and lat["threads"] == 1
    assert lat["detail"]["before"]["runs"] == FAST.latency_runs


def test_latency_is_measured_interleaved_with_medians(tmp_path: Path) -> None:
    small = _save(crafted.mlp(hidden=32), tmp_path / "s.onnx")
    large = _save(crafted.mlp(hidden=1024), tmp_path / "l.onnx")
    sessions = {"small": make_session(small, 1), "large": make_session(large, 1)}
    feed = generate_feeds(crafted.mlp(), 1)[0]
    lat = measure_latency(sessions, feed, runs=5, warmup=1)
    assert lat["small"]["runs"] == lat["large"]["runs"] == 5
    assert lat["small"]["min_ms"] <= lat["small"]["median_ms"] <= lat["small"]["max_ms"]
    # ~40x the multiply-adds: the ordering must show even on a noisy shared host.
    assert lat["large"]["median_ms"] > lat["small"]["median_ms"]


def test_latency_threads_are_one_and_the_targets_own_count_where_the_host_is_the_target() -> None:
    host = host_profile()
    cores = host.cores or 1
    limits = EngineLimits()
    expected_host = [1] if cores == 1 else [1, cores]
    assert latency_thread_counts(limits, None) == expected_host
    assert latency_thread_counts(limits, host) == expected_host
    # A profile with this host's kernels: its own cores, capped by the host's.
    twin = host.model_copy(update={"name": "twin", "cores": 2 * cores})
    assert latency_thread_counts(limits, twin) == expected_host
    assert latency_thread_counts(limits, host.model_copy(update={"name": "one", "cores": 1})) == [1]
    # A target the host cannot stand for is measured at the first count only.
    assert latency_thread_counts(limits, get_device("nvidia_t4")) == [1]
    # A benchmark pinning one thread count.
    pinned = EngineLimits(latency_threads=1, latency_target_threads=False)
    assert latency_thread_counts(pinned, None) == latency_thread_counts(pinned, host) == [1]
    # The same total budget of rounds, split (never below 5 per count).
    assert rounds_per_count(15, 1) == 15 and rounds_per_count(15, 2) == 8
    assert rounds_per_count(3, 2) == 3


def test_compare_latency_reports_each_thread_count_with_its_placebo(tmp_path: Path) -> None:
    small = _save(crafted.mlp(hidden=32), tmp_path / "s.onnx")
    feed = generate_feeds(crafted.mlp(), 1)[0]
    lat = compare_latency(small, small, feed, runs=6, limits=FAST, threads=[1, 2])
    assert [e["threads"] for e in lat["by_threads"]] == [1, 2] == lat["thread_counts"]
    # a busy host (placebo beyond DISTURBED_BAND) gets the target's count measured once more
    again = "remeasured_after_placebo" in lat["by_threads"][-1]
    assert lat["rounds"] == (15 if again else 10) and lat["rounds_per_thread_count"] == 5
    assert lat["threads"] == (1 if "decision_note" in lat else 2)
    for entry in lat["by_threads"]:
        # the placebo (the original against a second session of itself) is beside each ratio
        low, high = entry["noise_band"]
        assert low <= 1.0 <= high and low == pytest.approx(1 / high, rel=1e-3)
        assert entry["placebo_speedup"] > 0 and entry["placebo_ms"] > 0
    decision = lat["by_threads"][0 if "decision_note" in lat else -1]
    assert lat["speedup"] == decision["speedup"] and lat["noise_band"] == decision["noise_band"]
    assert lat["detail"]["placebo"]["runs"] == 5


def test_rounds_rotate_so_every_session_takes_every_position_and_follows_another() -> None:
    keys = ["before", "after", "placebo"]
    rounds = [rotation(keys, r) for r in range(6)]
    for key in keys:  # each position equally often
        assert sorted(order.index(key) for order in rounds) == [0, 0, 1, 1, 2, 2]
    flat = [k for order in rounds for k in order]
    # no session runs twice in a row (its own spinning pool would favour it)
    assert all(a != b for a, b in zip(flat, flat[1:], strict=False))


def _entry(threads: int, placebo: float, speedup: float, ms: float = 1.0) -> dict:
    return {"threads": threads, "rounds": 5, "speedup": speedup, "before_ms": ms,
            "noise_band": [round(1 / placebo, 4), placebo]}


def test_a_disturbed_target_count_is_measured_again_then_the_quiet_count_decides() -> None:
    calls: list[int] = []

    def again(result: dict) -> Callable[[], dict]:
        def measure() -> dict:
            calls.append(1)
            return dict(result)
        return measure

    # quiet, and threads pay: the target's count (last) decides, nothing measured again
    quiet = [_entry(1, 1.02, 1.0, ms=2.0), _entry(2, 1.04, 0.97, ms=1.1)]
    chosen, note = decide(quiet, again(_entry(2, 1.0, 1.0)))
    assert chosen is quiet[-1] and note is None and not calls
    # disturbed once, quiet the second time: the second measurement decides
    entries = [_entry(1, 1.02, 1.0, ms=2.0), _entry(2, 1.4, 0.7, ms=1.1)]
    chosen, note = decide(entries, again(_entry(2, 1.03, 0.99, ms=1.1)))
    assert calls == [1] and note is None
    assert chosen["speedup"] == 0.99 and chosen["remeasured_after_placebo"] == [0.7143, 1.4]
    assert entries[-1] is chosen and chosen["rounds"] == 10
    # disturbed twice: the quiet 1-thread measurement decides, and the note says why
    entries = [_entry(1, 1.02, 1.01, ms=2.0), _entry(2, 1.4, 0.7, ms=1.1)]
    chosen, note = decide(entries, again(_entry(2, 1.3, 0.75, ms=1.1)))
    assert chosen is entries[0] and note is not None
    assert "decided at 1 thread(s)" in note and "1.30x" in note
    # quiet, but the original ran slower at 2 threads than at 1 (the cores were busy, as on
    # this shared 2-core host: 32.7 ms against 8.8 ms): 1 thread decides
    entries = [_entry(1, 1.02, 0.99, ms=8.8), _entry(2, 1.08, 0.79, ms=32.7)]
    chosen, note = decide(entries, again(_entry(2, 1.0, 1.0)))
    assert chosen is entries[0] and note is not None and "ran slower (32.7 ms)" in note
    # every count disturbed: the target's own (second) measurement stays, without a note
    entries = [_entry(1, 1.2, 1.01), _entry(2, 1.4, 0.7)]
    chosen, note = decide(entries, again(_entry(2, 1.3, 0.75)))
    assert chosen is entries[-1] and chosen["speedup"] == 0.75 and note is None
