"""What a compression job returns: the compressed model, its report and its summary (typed).

The summary is the short form the job record, the CLI and dashboards show; the report is the
whole ``report.json`` (``docs/architecture.md`` lists its sections). Both are plain dicts at run
time, so they serialise as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict


class OutputFidelity(TypedDict):
    """One model output: the compressed model against the original on the evaluation inputs."""

    cosine: float | None
    sqnr_db: float | None
    max_abs_error: float | None
    top1_agreement: float | None


class AutoSummary(TypedDict):
    """What the auto search chose (``summary["auto"]``)."""

    candidate: str
    device: str
    target_latency_ms: float
    target_speedup: float | None


class Summary(TypedDict):
    """The headline numbers of a job (``summary`` of the job record and of ``report.json``)."""

    bytes_before: int
    bytes_after: int
    size_ratio: float
    bytes_after_zstd: int | None
    params_before: int
    params_after: int
    latency_ms_before: float
    latency_ms_after: float
    speedup: float | None  # the decision's: at the target's thread count (latency_threads[-1])
    latency_threads: list[int]  # intra-op thread counts measured, the decision's last
    speedup_1_thread: float | None
    speedup_threads: float | None  # at latency_threads[-1]
    placebo_band: list[float] | None  # [low, high]: the ratios noise alone gives here
    fidelity: dict[str, OutputFidelity]
    min_cosine: float | None
    # "dataset", "generated", or "dataset_holdout" (auto judged on the held-out split)
    eval_inputs: str
    eval_samples: int
    measured_on: str
    accuracy_before: float | None
    accuracy_after: float | None
    already_quantized: bool
    warnings: list[str]
    # ONNX Runtime session config entries the reported speed assumes (weight-only int8:
    # {"session.disable_quant_qdq": "1"}); absent when the default session was measured
    session_config: NotRequired[dict[str, str]]
    auto: NotRequired[AutoSummary]
    # causal decoders: KL divergence, top-1 agreement, perplexity, tokens/s, peak memory
    # (``service.engine.lm.SUMMARY_KEYS``)
    lm: NotRequired[dict[str, float | None]]
    # the engine process's peak resident set (MB), and how it was measured (the worker's
    # ``engine_host.PeakMemory``: VmHWM, sampled RssAnon / RssFile peaks, probes' peak)
    peak_rss_mb: NotRequired[float | None]
    memory: NotRequired[dict[str, Any]]


@dataclass
class PipelineResult:
    """What a job produced. ``artifacts`` always holds ``model.onnx``; ``model.onnx.data``
    when its weights are kept in external data (the file ``model.onnx`` names, beside it);
    ``model.onnx.zst`` when zstd helps; the worker writes ``report.json`` from ``report``."""

    model_path: Path
    report: dict[str, Any]
    summary: Summary
    artifacts: dict[str, Path] = field(default_factory=dict)


def engine_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgepress")
    except Exception:  # not installed as a distribution (tests from a checkout)
        return "0.1.0"
