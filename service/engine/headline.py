"""A job's headline numbers, read from one place: ``report["summary"]``.

``report.json``'s summary is what the job's ``result`` carries and what auto mode's choice
rests on (in auto mode: the head-to-head latency confirmation and the held-out fidelity and
accuracy, where the report's ``latency``/``fidelity`` sections keep each candidate's first,
in-sample numbers). ``report.html`` and ``edgepress report`` show these numbers through
``headline(report)``, so the three never disagree. Pure Python, no heavy imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.engine.wording import PlaceboBand, describe_speedup, noise_band

__all__ = ["Headline", "headline", "lm_rows", "threads_words"]


@dataclass(frozen=True)
class Headline:
    """The one speedup, fidelity and accuracy of a job, and how the latency was measured."""

    speedup: float | None
    placebo_band: PlaceboBand | None
    latency_ms_before: float | None
    latency_ms_after: float | None
    latency_how: str
    win_fraction: float | None
    min_cosine: float | None
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    eval_inputs: str | None = None
    eval_samples: int | None = None
    target_measured: bool | None = None  # auto mode: the target is this host (else estimated)
    # causal decoders: ``summary["lm"]`` (KL divergence, top-1, perplexity, tokens/s, memory)
    lm: dict[str, Any] = field(default_factory=dict)
    # One entry per intra-op thread count measured, the decision's (``speedup``'s) last:
    # {threads, speedup, placebo_band, before_ms, after_ms}.
    by_threads: list[dict[str, Any]] = field(default_factory=list)

    @property
    def speed_words(self) -> str:
        """``describe_speedup`` of the speedup, with its placebo band when one was measured."""
        return describe_speedup(self.speedup, self.placebo_band)

    @property
    def latency_threads(self) -> list[int]:
        return [int(e["threads"]) for e in self.by_threads]

    def thread_lines(self) -> list[str]:
        """One line per thread count: ``"2 threads: 1.31x faster (placebo band 0.97-1.03)"``,
        ``"1 thread: 0.95x, 5% slower, within noise (placebo band 0.84-1.19)"``."""
        lines = []
        for e in self.by_threads:
            band = noise_band(e.get("placebo_band"))
            n = e["threads"]
            words = describe_speedup(e.get("speedup"), band)
            ratio = f"{e['speedup']:.2f}x" if e.get("speedup") else ""
            lines.append(f"{n} thread{'s' if n != 1 else ''}: "
                         + (words if not ratio or words.startswith(ratio)
                            else f"{ratio}, {words}")
                         + (f" (placebo band {band[0]:.2f}-{band[1]:.2f})" if band else "")
                         + (" [decides]" if e is self.by_threads[-1] and len(self.by_threads) > 1
                            else ""))
        return lines


def _confirmed(report: Mapping[str, Any], summary: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Auto mode's head-to-head confirmation when the summary's speedup is its number."""
    auto = report.get("auto") or {}
    confirmation = auto.get("latency_confirmation") or {}
    chosen = (summary.get("auto") or {}).get("candidate") or (auto.get("chosen") or {}).get(
        "candidate")
    entry = (confirmation.get("candidates") or {}).get(chosen)
    if entry is None or entry.get("speedup") != summary.get("speedup"):
        return None
    return confirmation


def _by_threads(latency: Mapping[str, Any], confirmation: Mapping[str, Any] | None,
                chosen: str | None) -> list[dict[str, Any]]:
    """Per-thread-count numbers of the measurement the summary's speedup comes from."""
    if confirmation is not None:
        out = []
        for e in confirmation.get("by_threads") or []:
            cand = (e.get("candidates") or {}).get(chosen) or {}
            band = e.get("noise_band")
            out.append({"threads": e.get("threads"), "speedup": cand.get("speedup"),
                        "placebo_band": [1.0 / band, band] if band else None,
                        "before_ms": e.get("original_ms"), "after_ms": cand.get("ms")})
        return out
    return [{"threads": e.get("threads"), "speedup": e.get("speedup"),
             "placebo_band": e.get("noise_band"), "before_ms": e.get("before_ms"),
             "after_ms": e.get("after_ms")} for e in latency.get("by_threads") or []]


def headline(report: Mapping[str, Any]) -> Headline:
    """The headline of a ``report.json`` dict (missing numbers are None)."""
    summary = report.get("summary") or {}
    latency = report.get("latency") or {}
    auto = report.get("auto") or {}
    confirmation = _confirmed(report, summary)
    band = summary.get("placebo_band", summary.get("placebo_speedup"))
    win_fraction = None
    if confirmation is not None:
        others = len(confirmation.get("candidates") or {}) - 1
        counts = confirmation.get("thread_counts") or [confirmation.get("threads", "?")]
        how = ("head to head with the original"
               + (f" and {others} other finalist{'s' if others != 1 else ''}" if others > 0
                  else "")
               + f", {confirmation.get('rounds')} interleaved rounds at "
               + ", ".join(str(t) for t in counts) + " thread(s), medians")
    else:
        how = (f"{latency.get('rounds', '?')} interleaved rounds at "
               f"{', '.join(str(t) for t in latency.get('thread_counts') or [latency.get('threads', '?')])}"
               " thread(s), paired median")
        if band is None:
            band = latency.get("placebo_speedup")
        if band is not None:
            how += ", confirmed against a placebo run (the original against itself)"
        win_fraction = latency.get("win_fraction")
    source = summary.get("eval_inputs")
    samples = summary.get("eval_samples") or (report.get("eval_inputs") or {}).get("samples")
    if source == "dataset_holdout":
        samples = (auto.get("evaluation") or {}).get("holdout_samples")
    return Headline(
        speedup=summary.get("speedup"),
        placebo_band=band,
        latency_ms_before=summary.get("latency_ms_before"),
        latency_ms_after=summary.get("latency_ms_after"),
        latency_how=how,
        win_fraction=win_fraction,
        min_cosine=summary.get("min_cosine"),
        fidelity=dict(summary.get("fidelity") or {}),
        accuracy_before=summary.get("accuracy_before"),
        accuracy_after=summary.get("accuracy_after"),
        eval_inputs=source,
        eval_samples=samples,
        target_measured=auto.get("target_measured") if auto else None,
        lm=dict(summary.get("lm") or {}),
        by_threads=_by_threads(latency, confirmation,
                               (summary.get("auto") or {}).get("candidate")),
    )


def _fmt(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def lm_rows(lm: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A decoder's language-model numbers (``summary["lm"]``) as (label, text) rows; empty for
    other models. What the CLI prints and ``report.html`` shows."""
    if not lm:
        return []
    before, after = lm.get("perplexity_before"), lm.get("perplexity_after")
    change = lm.get("perplexity_increase")
    return [
        ("next-token KL divergence", _fmt(lm.get("kl_divergence"), 5) + " nats"),
        ("next-token top-1 agreement", _fmt(lm.get("top1_agreement"), 4)),
        ("perplexity", f"{_fmt(before, 3)} -> {_fmt(after, 3)}"
                       + (f" ({change * 100:+.2f}%)" if change is not None else "")),
        ("prefill tokens/s", f"{_fmt(lm.get('prefill_tokens_per_s_before'), 0)} -> "
                             f"{_fmt(lm.get('prefill_tokens_per_s_after'), 0)}"),
        ("decode tokens/s", f"{_fmt(lm.get('decode_tokens_per_s_before'), 1)} -> "
                            f"{_fmt(lm.get('decode_tokens_per_s_after'), 1)} (KV cache on "
                            "the host)"),
        ("peak memory", f"{_fmt(lm.get('peak_memory_mb_before'), 1)} -> "
                        f"{_fmt(lm.get('peak_memory_mb_after'), 1)} MB (peak RSS of a "
                        "process running only that model)"),
    ]


def threads_words(summary: Mapping[str, Any]) -> str | None:
    """A job result's (a summary's) speedups per thread count in one line, e.g.
    ``"1 thread: 1.40x faster; 2 threads: 1.31x faster (decides, placebo band 0.97-1.03)"``;
    None when the summary has no per-thread numbers."""
    counts = summary.get("latency_threads") or []
    if not counts:
        return None
    band = noise_band(summary.get("placebo_band"))
    parts = []
    if len(counts) > 1 and 1 in counts[:-1]:
        parts.append(f"1 thread: {describe_speedup(summary.get('speedup_1_thread'))}")
    n = counts[-1]
    parts.append(f"{n} thread{'s' if n != 1 else ''}: "
                 f"{describe_speedup(summary.get('speedup'), band)} ("
                 + ("decides, " if len(counts) > 1 else "")
                 + (f"placebo band {band[0]:.2f}-{band[1]:.2f}" if band else "no placebo")
                 + ")")
    return "; ".join(parts)
