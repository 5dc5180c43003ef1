"""``report.html``: a job's report as one self-contained page (no external resources).

``render_report_html(report)`` turns the ``report.json`` dict of ``compress`` (recipe or
auto mode) into HTML with inline SVG charts drawn here (no plotting library): model summary,
the chosen candidate and why (auto), the Pareto front (size vs latency, coloured by fidelity),
per-layer sensitivity and precision, latency by op type before/after (when the report has it),
target estimates, the size/latency/fidelity/accuracy tables, passes and warnings. The CSS is
responsive, so the page reads on a phone; every value is HTML-escaped.

``op_type_latency(model_path, inputs, runs)`` measures per-op-type time with ONNX Runtime's
profiler, and ``op_latency_section(original, candidate, feed, runs)`` gives the before/after
block the page draws (``report["latency"]["by_op_type"]``).

Module imports stay light (no onnxruntime at import time).
"""

from __future__ import annotations

import html
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.headline import Headline, headline, lm_rows

__all__ = ["render_report_html", "op_type_latency", "op_latency_section"]

# ---------------------------------------------------------------------------------------------
# Per-op-type latency (ONNX Runtime profiling)


def op_type_latency(
    model_path: str | Path, inputs: Mapping[str, np.ndarray], runs: int = 20, *,
    warmup: int = 3, threads: int = 1,
) -> dict[str, float]:
    """Milliseconds per inference spent in each op type, from ONNX Runtime's profiler.

    The model runs ``warmup`` times, then ``runs`` times; only kernel events inside the last
    ``runs`` ``model_run`` windows count, summed per op type and divided by ``runs``. Op types
    are ONNX Runtime's (after its graph optimisations, e.g. ``FusedMatMul``,
    ``DynamicQuantizeMatMul``), which is what actually ran. Sorted by time, largest first.
    """
    from service.engine.evaluate import make_session  # as every measurement loads it

    runs = max(1, int(runs))
    with tempfile.TemporaryDirectory(prefix="ep-prof-") as tmp:
        session = make_session(Path(model_path), threads,
                               profile_prefix=str(Path(tmp) / "profile"))
        feed = _adapt(session, inputs)
        for _ in range(max(0, warmup) + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[-runs:]
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e.get("ts", 0)
        if not any(start <= ts <= end for start, end in windows):
            continue
        op = str(e.get("args", {}).get("op_name") or "unknown")
        totals[op] = totals.get(op, 0.0) + float(e.get("dur", 0)) / 1000.0  # us -> ms
    per_run = {op: ms / max(len(windows), 1) for op, ms in totals.items()}
    return dict(sorted(per_run.items(), key=lambda kv: -kv[1]))


def _adapt(session: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feed only the session's inputs, cast to the dtypes it declares."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    out = {}
    for i in session.get_inputs():
        value = np.asarray(inputs[i.name])
        want = types.get(i.type)
        out[i.name] = value.astype(want) if want is not None and value.dtype != want else value
    return out


def op_latency_section(
    original_path: str | Path, candidate_path: str | Path, feed: Mapping[str, np.ndarray],
    runs: int = 20, *, threads: int = 1, original_note: str | None = None,
) -> dict[str, Any]:
    """``{"before": {op: ms}, "after": {op: ms}, "runs", "threads", "unit": "ms"}`` for the
    report (``report["latency"]["by_op_type"]``). ``original_note``: why the original is not
    profiled (``before`` empty, the note kept)."""
    return {
        "before": ({} if original_note else
                   op_type_latency(original_path, feed, runs, threads=threads)),
        "after": op_type_latency(candidate_path, feed, runs, threads=threads),
        "runs": runs, "threads": threads, "unit": "ms",
        "source": "ONNX Runtime profiler, kernel time per op type per inference",
        **({"before_note": original_note} if original_note else {}),
    }


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        text = f"{value:,.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return _e(value)


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _ms(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if value < 1:
        return f"{value * 1000:.1f} µs"
    return f"{value:.2f} ms"


def _x(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, (int, float)) else "–"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table whose cells are already HTML (escaped by the caller); scrolls on a phone."""
    if not rows:
        return ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs if v not in ("", None))
    return f'<dl class="kv">{items}</dl>'


def _section(title: str, body: str, ident: str) -> str:
    if not body.strip():
        return ""
    return f'<section id="{ident}"><h2>{_e(title)}</h2>{body}</section>'


# ---------------------------------------------------------------------------------------------
# SVG charts


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.5:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _fidelity_color(fid: float | None, lo: float) -> str:
    """Red (worst seen) -> amber -> green (1.0); grey when unknown."""
    if fid is None:
        return "#9aa0a6"
    span = max(1.0 - lo, 1e-6)
    t = min(1.0, max(0.0, (fid - lo) / span))
    hue = 8 + t * 132  # 8 = red, 140 = green
    return f"hsl({hue:.0f},70%,42%)"


def _scatter_svg(points: list[dict], *, x: str, y: str, chosen: str | None,
                 x_label: str, y_label: str) -> str:
    """Pareto scatter: x/y axes, colour = fidelity, ring = chosen, line = the front."""
    pts = [p for p in points if isinstance(p.get(x), (int, float))
           and isinstance(p.get(y), (int, float))]
    if not pts:
        return ""
    w, h, ml, mr, mt, mb = 480, 320, 56, 16, 14, 48
    xs = [float(p[x]) for p in pts]
    ys = [float(p[y]) for p in pts]
    xt = _nice_ticks(0.0, max(xs) * 1.08)
    yt = _nice_ticks(0.0, max(ys) * 1.12)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * (w - ml - mr)

    def py(v: float) -> float:
        return h - mb - (v - y0) / (y1 - y0) * (h - mt - mb)

    fids = [float(p["fidelity"]) for p in pts if isinstance(p.get("fidelity"), (int, float))]
    lo = min([*fids, 0.99])
    parts = [f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{_e(y_label)} against {_e(x_label)}">']
    for t in xt:
        parts.append(f'<line class="grid" x1="{px(t):.1f}" y1="{mt}" x2="{px(t):.1f}" '
                     f'y2="{h - mb}"/><text class="tick" x="{px(t):.1f}" y="{h - mb + 16}" '
                     f'text-anchor="middle">{_tick_label(t)}</text>')
    for t in yt:
        parts.append(f'<line class="grid" x1="{ml}" y1="{py(t):.1f}" x2="{w - mr}" '
                     f'y2="{py(t):.1f}"/><text class="tick" x="{ml - 6}" y="{py(t) + 4:.1f}" '
                     f'text-anchor="end">{_tick_label(t)}</text>')
    parts.append(f'<line class="axis" x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}"/>'
                 f'<line class="axis" x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}"/>')
    parts.append(f'<text class="label" x="{(ml + w - mr) / 2}" y="{h - 10}" '
                 f'text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text class="label" transform="translate(16 {(mt + h - mb) / 2}) '
                 f'rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    front = sorted((p for p in pts if p.get("on_front")), key=lambda p: float(p[x]))
    if len(front) > 1:
        path = " ".join(f"{px(float(p[x])):.1f},{py(float(p[y])):.1f}" for p in front)
        parts.append(f'<polyline class="front" points="{path}"/>')
    for p in sorted(pts, key=lambda p: p.get("candidate") == chosen):
        cx, cy = px(float(p[x])), py(float(p[y]))
        name = str(p.get("candidate"))
        color = _fidelity_color(p.get("fidelity"), lo)
        tip = (f"{name}: {p[x]:.4g} {x_label.split(' ')[-1]}, {p[y]:.4g} "
               f"{y_label.split(' ')[-1]}, fidelity "
               f"{p['fidelity']:.5f}" if isinstance(p.get("fidelity"), (int, float))
               else f"{name}")
        shape = (f'<rect class="pt" x="{cx - 6:.1f}" y="{cy - 6:.1f}" width="12" height="12" '
                 f'fill="{color}"><title>{_e(tip)}</title></rect>' if name == "original" else
                 f'<circle class="pt" cx="{cx:.1f}" cy="{cy:.1f}" r="7" fill="{color}">'
                 f'<title>{_e(tip)}</title></circle>')
        parts.append(shape)
        if name == chosen:
            parts.append(f'<circle class="chosen" cx="{cx:.1f}" cy="{cy:.1f}" r="12"/>')
        anchor = "end" if cx > w * 0.7 else "start"
        dx = -10 if anchor == "end" else 10
        parts.append(f'<text class="ptlabel" x="{cx + dx:.1f}" y="{cy - 9:.1f}" '
                     f'text-anchor="{anchor}">{_e(name)}</text>')
    parts.append("</svg>")
    legend = (f'<p class="legend"><span class="sw" style="background:{_fidelity_color(lo, lo)}">'
              f'</span> fidelity {lo:.4f} <span class="sw" style="background:'
              f'{_fidelity_color(1.0, lo)}"></span> 1.0 &nbsp; ■ original &nbsp; ◯ chosen '
              f'&nbsp; — Pareto front</p>')
    return "".join(parts) + legend


def _hbar_svg(rows: list[tuple[str, list[float | None]]], series: list[str],
              unit: str, *, highlight: set[str] | None = None, signed: bool = False) -> str:
    """Horizontal bars, one group per row, one bar per series (before/after ...)."""
    rows = [r for r in rows if any(isinstance(v, (int, float)) for v in r[1])]
    if not rows:
        return ""
    colors = ["#5f6b7a", "#1a73e8", "#e37400"]
    bar_h, gap = 16, 10
    group_h = bar_h * len(series) + gap
    label_w, w, mr = 190, 520, 56  # label column fits ~18 characters at the chart's font size
    top = 24 if len(series) > 1 else 4
    h = top + group_h * len(rows) + 8
    values = [abs(float(v)) for _, vs in rows for v in vs if isinstance(v, (int, float))]
    vmax = max(values) if values and max(values) > 0 else 1.0
    parts = [f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="bar chart">']
    lx = label_w
    for i, name in enumerate(series if len(series) > 1 else []):
        parts.append(f'<rect x="{lx}" y="4" width="12" height="12" fill="{colors[i % 3]}"/>'
                     f'<text class="tick" x="{lx + 16}" y="14">{_e(name)}</text>')
        lx += 24 + 8 * len(name)
    for gi, (label, vals) in enumerate(rows):
        y = top + gi * group_h
        cls = "rowlabel hl" if highlight and label in highlight else "rowlabel"
        short = label if len(label) <= 18 else label[:17] + "…"
        parts.append(f'<text class="{cls}" x="{label_w - 8}" y="{y + group_h / 2}" '
                     f'text-anchor="end"><title>{_e(label)}</title>{_e(short)}</text>')
        for si, v in enumerate(vals):
            if not isinstance(v, (int, float)):
                continue
            bw = abs(float(v)) / vmax * (w - label_w - mr)
            by = y + si * bar_h
            fill = colors[si % 3] if not (signed and v < 0) else "#c5221f"
            parts.append(f'<rect x="{label_w}" y="{by}" width="{max(bw, 1):.1f}" '
                         f'height="{bar_h - 2}" fill="{fill}"><title>{_e(label)} '
                         f'{_e(series[si])}: {v:.4g} {_e(unit)}</title></rect>'
                         f'<text class="tick" x="{label_w + bw + 4:.1f}" y="{by + bar_h - 4}">'
                         f'{_tick_label(float(v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Sections


def _summary(report: dict) -> str:
    h = headline(report)
    size = report.get("size") or {}
    cards = [
        ("Size", f"{_bytes(size.get('bytes_before'))} → {_bytes(size.get('bytes_after'))}",
         f"{_x(size.get('ratio'))} smaller" if size.get("ratio") else ""),
        ("Latency (this host)", f"{_ms(h.latency_ms_before)} → {_ms(h.latency_ms_after)}",
         _speed(h)),
        ("Fidelity", f"min cosine {_num(h.min_cosine, 5)}", f"on {_e(_evidence(h))}"),
    ]
    if h.accuracy_before is not None:
        cards.append(("Accuracy", f"{_num(h.accuracy_before * 100, 2)}% → "
                      f"{_num((h.accuracy_after or 0) * 100, 2)}%", ""))
    if h.lm:
        cards.append(("Language model", f"KL divergence {_num(h.lm.get('kl_divergence'), 5)}",
                      f"perplexity {_num(h.lm.get('perplexity_before'), 3)} → "
                      f"{_num(h.lm.get('perplexity_after'), 3)}"))
    auto = (report.get("summary") or {}).get("auto") or {}
    # An estimate only where nothing was measured: beside a measurement on the same machine
    # a cost-model figure is a second, worse answer to the same question.
    if auto.get("target_latency_ms") is not None and h.target_measured is False:
        cards.append((f"Estimated on {auto.get('device')}", _ms(auto["target_latency_ms"]),
                      f"{_x(auto.get('target_speedup'))} speed (cost model)"
                      if auto.get("target_speedup") else "cost model"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="ct">{_e(t)}</div><div class="cv">{v}</div>'
        f'<div class="cs">{sub}</div></div>' for t, v, sub in cards) + "</div>"


def _speed(h: Headline) -> str:
    """"1.31× · 1.31x faster": the ratio and its words (the words say slower when it is)."""
    if not isinstance(h.speedup, (int, float)):
        return ""
    return f"{_x(h.speedup)} · {_e(h.speed_words)}"


def _evidence(h: Headline) -> str:
    source = h.eval_inputs or "unknown"
    return f"{source} inputs" + (f", {h.eval_samples} samples" if h.eval_samples else "")


def _model(report: dict) -> str:
    d = report.get("input") or {}
    if not d:
        return ""

    def io(values: list[dict]) -> str:
        return ", ".join(f"<code>{_e(v.get('name'))}</code> {_e(v.get('dtype', ''))}"
                         f"[{_e(', '.join(str(x) for x in v.get('shape') or []))}]"
                         for v in values)

    ops = d.get("op_types") or {}
    top = ", ".join(f"{_e(k)} ×{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:12])
    body = _kv([
        ("Format", _e(d.get("format", ""))),
        ("Opset", _num(d.get("opset"))),
        ("Producer", _e(d.get("producer") or "–")),
        ("Parameters", _num(d.get("parameter_count"))),
        ("Nodes", _num(d.get("node_count"))),
        ("Inputs", io(d.get("inputs") or [])),
        ("Outputs", io(d.get("outputs") or [])),
        ("Op types", top),
        ("Control flow", _num(d.get("control_flow"))),
        ("Already quantized", _num(d.get("already_quantized"))),
    ])
    notes = report.get("normalisation") or []
    if notes:
        body += "<h3>Normalisation</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) \
            + "</ul>"
    return body


def _chosen(auto: dict) -> str:
    chosen = auto.get("chosen") or {}
    if not chosen:
        return ""
    cons = {k: v for k, v in (auto.get("constraints") or {}).items()
            if v is not None and k not in ("max_candidates", "workers")}
    body = (f'<p class="why"><strong>{_e(chosen.get("candidate"))}</strong>: '
            f'{_e(chosen.get("why", ""))}</p>')
    body += _kv([
        ("Device", _e((auto.get("device") or {}).get("title")
                      or (auto.get("device") or {}).get("name", ""))),
        ("Measured here", _num(auto.get("target_measured"))),
        ("Objective", _e(auto.get("objective", ""))),
        ("Constraints", ", ".join(f"{_e(k)} = {_e(v)}" for k, v in cons.items())),
        ("Recipe", "<code>" + _e(json.dumps(chosen.get("recipe"))) + "</code>"),
        ("Search", f"{_num(auto.get('search_seconds'))} s, {_num(auto.get('workers'))} "
                   "worker(s)" + (f"; stopped early: {_e(auto['early_stop']['reason'])}"
                                  if (auto.get("early_stop") or {}).get("stopped") else "")),
    ])
    if auto.get("note"):
        body += f'<p class="note">{_e(auto["note"])}</p>'
    return body


def _candidates(auto: dict) -> str:
    rows = []
    chosen = (auto.get("chosen") or {}).get("candidate")
    measured = bool(auto.get("target_measured"))  # the target is this host: no estimate
    decoder = (auto.get("model") or {}).get("family") == "decoder"
    for c in auto.get("candidates") or []:
        m = c.get("metrics") or {}
        if c.get("status") == "ok" or m:
            outcome = ("meets constraints" if c.get("meets_constraints") else
                       "; ".join(f"{v.get('constraint')}: {v.get('value')} vs {v.get('limit')}"
                                 for v in c.get("violations") or []))
        else:
            outcome = (c.get("error") or {}).get("message", c.get("status", ""))
        name = _e(c.get("name"))
        rows.append([
            f"<strong>{name}</strong> ✓" if c.get("name") == chosen else name,
            _e(c.get("status")), _bytes(m.get("bytes")), _x(m.get("size_ratio")),
            _ms(m.get("host_latency_ms")),
            *([] if measured else [_ms(m.get("target_latency_ms"))]),
            _num(m.get("min_cosine"), 5),
            *([_num(m.get("kl_divergence"), 5), _num(m.get("perplexity_after"), 3)] if decoder
              else [_num(m.get("accuracy_after"), 4)]),
            f'<span class="small">{_e(outcome)}</span>',
        ])
    return _table(["Candidate", "Status", "Size", "Smaller", "Host latency (measured)",
                   *([] if measured else ["Target latency (estimated)"]),
                   "Min cosine", *(["KL divergence", "Perplexity"] if decoder else ["Accuracy"]),
                   "Outcome"], rows)


def _pareto(auto: dict) -> str:
    front = auto.get("pareto_front") or {}
    points = front.get("points") or []
    if not points:
        return ""
    where = ("measured on this host" if front.get("latency_source") == "host_measured"
             else "estimated on the target")
    chart = _scatter_svg(points, x="size_mb", y="latency_ms",
                         chosen=(auto.get("chosen") or {}).get("candidate"),
                         x_label="model size (MB)", y_label="latency (ms)")
    names = ", ".join(_e(n) for n in front.get("front") or [])
    if "decode_tokens_per_s" in points[0]:  # a decoder: its front is in tokens/s and KLD
        on = sorted((p for p in points if p.get("on_front")), key=lambda p: p["size_mb"])
        table = _table(["Candidate", "Size", "Decode tokens/s", "KL divergence",
                        "Perplexity change"],
                       [[_e(p["candidate"]), _bytes((p.get("size_mb") or 0) * 1e6),
                         _num(p.get("decode_tokens_per_s"), 1),
                         _num(p.get("kl_divergence"), 5),
                         (f"{p['perplexity_increase'] * 100:+.2f} %"
                          if p.get("perplexity_increase") is not None else "–")]
                        for p in on])
        return (f"<p>Non-dominated in size, decode tokens/s (measured on this host) and "
                f"next-token KL divergence:</p>{table}<p>Size against latency "
                f"({_e(where)}); colour is fidelity (min cosine to the original).</p>{chart}")
    return (f"<p>Size against latency ({_e(where)}); colour is fidelity (min cosine to the "
            f"original). Non-dominated: {names or '–'}.</p>{chart}")


def _sensitivity(report: dict) -> str:
    auto = report.get("auto") or {}
    body = ""
    tried = auto.get("mixed_precision") or []  # one record per candidate tried, in order
    mp = next((r for r in tried if r.get("kept_float")), tried[-1] if tried else {})
    sens = mp.get("sensitivity") or []
    if sens:
        kept = set(mp.get("kept_float") or [])
        rows = [(f"{s.get('layer')} ({s.get('op')})", [s.get("gain")]) for s in sens[:24]]
        body += (f"<p>Gain in {_e(mp.get('metric', 'metric'))} when each layer alone stays in "
                 f"float (from {_e(mp.get('from', ''))}; base {_num(mp.get('base'), 5)}). "
                 f"Kept in float: {_e(', '.join(sorted(kept)) or 'none')}.</p>")
        body += _hbar_svg(rows, ["gain if kept float"], mp.get("metric", ""),
                          highlight={f"{s.get('layer')} ({s.get('op')})" for s in sens
                                     if s.get("layer") in kept}, signed=True)
        if mp.get("result"):
            body += f'<p class="note">{_e(mp["result"])}</p>'
    # Precision per layer: what each pass did to which node.
    layers: list[list[str]] = []
    for p in report.get("passes") or []:
        notes = p.get("notes") or {}
        for key, label in (("quantized", None), ("weight_only_int8", "int8 weight-only"),
                           ("kept_float", "float (kept)"), ("skipped", "skipped")):
            items = notes.get(key)
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict):
                    layers.append([_e(item.get("node", "")), _e(item.get("op", "")),
                                   _e(label or item.get("kernel") or item.get("precision")
                                      or p.get("pass")), _e(p.get("pass"))])
                else:
                    layers.append([_e(item), "", _e(label or p.get("pass")), _e(p.get("pass"))])
    if layers:
        counts: dict[str, int] = {}
        for row in layers:
            counts[html.unescape(row[2])] = counts.get(html.unescape(row[2]), 0) + 1
        body += "<h3>Precision by layer</h3>"
        body += _hbar_svg([(k, [float(v)]) for k, v in counts.items()], ["layers"], "layers")
        body += _table(["Layer", "Op", "Precision / kernel", "Pass"], layers[:200])
    chosen_est = (auto.get("chosen") or {}).get("target_estimate") or {}
    by_prec = chosen_est.get("by_precision") or {}
    if by_prec:
        body += f"<h3>Estimated time by precision on {_e(chosen_est.get('device'))}</h3>"
        body += _hbar_svg([(k, [v.get("ms")]) for k, v in by_prec.items()], ["ms"], "ms")
    return body


def _op_latency(report: dict) -> str:
    block = (report.get("latency") or {}).get("by_op_type") or report.get("op_latency") or {}
    before, after = block.get("before") or {}, block.get("after") or {}
    if not before and not after:
        return ""
    ops = sorted(set(before) | set(after), key=lambda o: -(before.get(o, 0) + after.get(o, 0)))
    rows = [(op, [before.get(op), after.get(op)]) for op in ops[:20]]
    total_b, total_a = sum(before.values()), sum(after.values())
    return (f"<p>Kernel time per inference by op type ({_e(block.get('source', 'profiler'))}, "
            f"{_num(block.get('runs'))} runs): {_ms(total_b)} before, {_ms(total_a)} after. "
            "Op types are what ONNX Runtime ran after its own fusions.</p>"
            + _hbar_svg(rows, ["before", "after"], "ms"))


def _estimates(report: dict) -> str:
    auto = report.get("auto") or {}
    cm = auto.get("cost_model") or {}
    orig = cm.get("target_original") or {}
    new = (auto.get("chosen") or {}).get("target_estimate") or {}
    body = ""
    # The target is this host: its numbers are measured (Summary, Measurements); a cost-model
    # estimate beside them would be a second answer. The calibration below compares the two.
    if (orig or new) and not auto.get("target_measured"):
        keys = [("latency_ms", "Latency", _ms), ("peak_memory_mb", "Peak memory (MB)", _num),
                ("weight_mb", "Weights (MB)", _num), ("energy_mj", "Energy (mJ)", _num),
                ("compute_bound_fraction", "Compute-bound fraction", _num)]
        rows = [[_e(label), fmt(orig.get(k)), fmt(new.get(k))] for k, label, fmt in keys]
        body += (f"<p>Cost-model estimates for one inference on "
                 f"{_e(new.get('device') or orig.get('device'))}.</p>"
                 + _table(["", "Original", "Chosen"], rows))
        for item in (new.get("unsupported") or []):
            body += f'<p class="note">Runs slowly on the target: {_e(item)}</p>'
        assumptions = list(dict.fromkeys((orig.get("assumptions") or [])
                                         + (new.get("assumptions") or [])))
        if assumptions:
            body += "<ul>" + "".join(f"<li>{_e(a)}</li>" for a in assumptions) + "</ul>"
    cal = cm.get("host_calibration") or {}
    check = cal.get("uncalibrated") or {}
    if check.get("points"):
        stated = check.get("stated_error_pct")
        body += ("<h3>Cost model on this host</h3>"
                 f"<p>Estimated with the cost model's {_e(check.get('constants'))} constants"
                 + (f" (stated error: median {_num(stated, 1)}% leave-one-model-out, "
                    "docs/bench/cost_model.txt)" if stated is not None else "")
                 + ", against the latency measured here.</p>"
                 + _table(["Model", "Estimated", "Measured", "Error"],
                          [[_e(p.get("model")), _ms(p.get("estimated_ms")),
                            _ms(p.get("measured_ms")), f"{_num(p.get('error_pct'), 1)}%"]
                           for p in check["points"]]))
    if cal.get("points"):
        body += ("<h3>Cost model calibrated on this job</h3>"
                 f"<p>Median error {_num(cal.get('median_abs_error_pct'), 1)}%.</p>"
                 + _table(["Model", "Predicted", "Measured", "Error"],
                          [[_e(p.get("model")), _ms(p.get("predicted_ms")),
                            _ms(p.get("measured_ms")), f"{_num(p.get('error_pct'), 1)}%"]
                           for p in cal["points"]]))
    return body


def _measurements(report: dict) -> str:
    size, lat = report.get("size") or {}, report.get("latency") or {}
    s = report.get("summary") or {}
    h = headline(report)
    body = "<h3>Size</h3>" + _table(["", "Before", "After"], [
        ["File", _bytes(size.get("bytes_before")), _bytes(size.get("bytes_after"))],
        ["zstd artifact", "–", _bytes(size.get("bytes_after_zstd"))],
        ["Parameters", _num(s.get("params_before")), _num(s.get("params_after"))],
    ])
    rows = [
        ["Before (median)", _ms(h.latency_ms_before)],
        ["After (median)", _ms(h.latency_ms_after)],
        ["Speedup", _speed(h) or "–"],
        ["Measured", _e(h.latency_how)],
        *[[f"At {e['threads']} thread(s)", _e(line)]
          for e, line in zip(h.by_threads, h.thread_lines(), strict=True)],
    ]
    if h.win_fraction is not None:
        rows.append(["Rounds after faster", _num(h.win_fraction, 2)])
    rows.append(["Input shapes", _e(json.dumps(lat.get("input_shapes")))])
    body += "<h3>Latency on this host</h3>" + _table(["", "Value"], rows)
    if h.fidelity:
        body += "<h3>Fidelity per output</h3>" + _table(
            ["Output", "Cosine", "SQNR (dB)", "Max abs error", "Top-1 agreement"],
            [[f"<code>{_e(n)}</code>", _num(f.get("cosine"), 6), _num(f.get("sqnr_db"), 2),
              _num(f.get("max_abs_error"), 4), _num(f.get("top1_agreement"), 4)]
             for n, f in h.fidelity.items()])
    acc = report.get("accuracy") or {}
    if h.accuracy_before is not None and h.accuracy_after is not None:
        body += "<h3>Accuracy</h3>" + _table(["Output", "Before", "After", "Change", "Samples"], [[
            f"<code>{_e(acc.get('output'))}</code>", _num(h.accuracy_before, 4),
            _num(h.accuracy_after, 4), _num(h.accuracy_after - h.accuracy_before, 4),
            _num(h.eval_samples if h.eval_inputs == "dataset_holdout" else acc.get("samples"))]])
    if h.lm:
        lm = report.get("lm") or {}
        body += "<h3>Language model</h3>" + _table(
            ["", "Value"], [[_e(label), _e(text)] for label, text in lm_rows(h.lm)])
        body += (f'<p class="small">On {_num(lm.get("sequences"))} evaluation sequences of '
                 f'{_num(lm.get("sequence_length"))} tokens ({_e(lm.get("source"))}); '
                 f'perplexity targets: {_e(lm.get("perplexity_targets"))}; tokens/s: a '
                 f'{_num(lm.get("prompt_length"))}-token prefill and '
                 f'{_num(lm.get("decode_tokens"))} decode steps, {_num(lm.get("threads"))} '
                 "thread(s).</p>")
    if h.eval_inputs:
        body += f'<p class="small">Evaluation inputs: {_e(_evidence(h))}.</p>'
    return body


def _passes(report: dict) -> str:
    rows = []
    for p in report.get("passes") or []:
        cfg = {k: v for k, v in (p.get("config") or {}).items() if v not in (None, [], {})}
        notes = p.get("notes") or {}
        brief = {k: v for k, v in notes.items() if not isinstance(v, (list, dict))}
        rows.append([f"<code>{_e(p.get('pass'))}</code>",
                     f'<span class="small">{_e(json.dumps(cfg))}</span>',
                     _num(p.get("seconds"), 2),
                     f'<span class="small">{_e(json.dumps(brief, default=str)[:400])}</span>'])
    body = _table(["Pass", "Config", "Seconds", "Notes"], rows)
    cal = report.get("calibration")
    if cal:
        body += f"<p class=\"small\">Calibration: {_e(json.dumps(cal, default=str)[:300])}</p>"
    return body


def _warnings(report: dict) -> str:
    warnings = report.get("warnings") or []
    if not warnings:
        return "<p>None.</p>"
    return '<ul class="warn">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"


_CSS = """
:root{--fg:#202124;--muted:#5f6368;--bg:#fff;--card:#f6f8fa;--line:#dadce0;--accent:#1a73e8}
@media (prefers-color-scheme:dark){:root{--fg:#e8eaed;--muted:#9aa0a6;--bg:#1f1f1f;
--card:#2a2a2a;--line:#3c4043;--accent:#8ab4f8}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
main{max-width:960px;margin:0 auto;padding:16px}
h1{font-size:1.5rem;margin:.2em 0}h2{font-size:1.2rem;margin:1.6em 0 .5em;
border-bottom:1px solid var(--line);padding-bottom:.2em}h3{font-size:1rem;margin:1.2em 0 .4em}
.sub{color:var(--muted);margin:0 0 1em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:10px}
.card{background:var(--card);border-radius:10px;padding:10px 12px}
.ct{color:var(--muted);font-size:.8rem;text-transform:uppercase;letter-spacing:.04em}
.cv{font-size:1.1rem;font-weight:600}.cs{color:var(--muted);font-size:.85rem}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:var(--card);white-space:nowrap}
dl.kv{display:grid;grid-template-columns:minmax(110px,max-content) 1fr;gap:4px 14px;margin:0}
dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em;overflow-wrap:anywhere}
.small{font-size:.82rem}td.wide,td:has(.small){min-width:16em}.note{color:var(--muted);font-style:italic}
.why{background:var(--card);border-left:4px solid var(--accent);padding:8px 12px;
border-radius:4px}
ul.warn li{color:#b06000}
svg.chart{width:100%;height:auto;max-width:100%;display:block;margin:8px 0}
svg .grid{stroke:var(--line);stroke-width:1}svg .axis{stroke:var(--muted);stroke-width:1.2}
svg text{fill:var(--fg);font-size:13px}svg .tick{fill:var(--muted);font-size:12px}
svg .label{font-size:14px}svg .ptlabel{font-size:13px}
svg .front{fill:none;stroke:var(--accent);stroke-width:1.5;stroke-dasharray:5 4}
svg .pt{stroke:var(--bg);stroke-width:1.5}
svg .chosen{fill:none;stroke:var(--fg);stroke-width:2}
svg .rowlabel{font-size:12px}svg .hl{font-weight:700;fill:var(--accent)}
.legend{font-size:.82rem;color:var(--muted)}
.sw{display:inline-block;width:10px;height:10px;border-radius:50%;vertical-align:middle}
nav{font-size:.85rem;margin:.5em 0}nav a{color:var(--accent);margin-right:10px;
text-decoration:none}
footer{color:var(--muted);font-size:.8rem;margin:2em 0 1em}
@media (max-width:520px){main{padding:10px}body{font-size:14px}}
"""


def render_report_html(report: dict, *, title: str | None = None) -> str:
    """The whole page for one job's ``report.json`` (self-contained, responsive, escaped)."""
    auto = report.get("auto") or {}
    device = report.get("device") or {}
    name = title or "EdgePress compression report"
    mode = "auto search" if auto else "recipe " + " → ".join(
        str(step.get("pass")) for step in report.get("recipe") or [] if isinstance(step, dict))
    sections = [
        ("Summary", _summary(report), "summary"),
        ("Chosen candidate", _chosen(auto), "chosen"),
        ("Pareto front", _pareto(auto), "pareto"),
        ("Candidates", _candidates(auto), "candidates"),
        ("Layers: sensitivity and precision", _sensitivity(report), "layers"),
        ("Latency by op type", _op_latency(report), "ops"),
        ("Target estimates", _estimates(report), "estimates"),
        ("Measurements", _measurements(report), "measurements"),
        ("Model", _model(report), "model"),
        ("Passes", _passes(report), "passes"),
        ("Warnings", _warnings(report), "warnings"),
    ]
    rendered = [(t, _section(t, body, ident), ident) for t, body, ident in sections]
    nav = "".join(f'<a href="#{ident}">{_e(t)}</a>' for t, html_, ident in rendered if html_)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(name)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{_e(name)}</h1>"
        f'<p class="sub">{_e(mode)} · target {_e(device.get("title") or device.get("name", "host"))}'
        f' · engine {_e(report.get("engine_version", ""))}</p>'
        f"<nav>{nav}</nav>"
        + "".join(h for _, h, _ in rendered)
        + "<footer>Generated by EdgePress. Latency is measured on the worker's CPU unless "
        "marked as estimated; estimates come from the device profile's cost model.</footer>"
        "</main></body></html>"
    )
