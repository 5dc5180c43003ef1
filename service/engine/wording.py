"""Words for measured numbers, generated from the numbers themselves.

The engine's warnings, ``report.html`` and the CLI describe a speed ratio the same way, so that
a slower model is never called "0.80x faster" and a difference inside the measurement noise is
said to be one. Pure Python, no heavy imports (the API process and the CLI use it).
"""

from __future__ import annotations

import math

__all__ = ["describe_speedup", "noise_band"]

PlaceboBand = float | tuple[float, float] | list[float]


def noise_band(placebo_band: PlaceboBand | None) -> tuple[float, float] | None:
    """The (low, high) speed ratios that noise alone produces.

    ``placebo_band`` is either the ratio measured by timing the original against itself the
    same way (a placebo run, e.g. ``1.04`` or ``0.97``: the band is symmetric, from
    ``1/r`` to ``r``), or an explicit ``(low, high)`` pair (a list, as read back from JSON, too). None, or an unusable value: no band.
    """
    if placebo_band is None:
        return None
    if isinstance(placebo_band, (tuple, list)):
        if len(placebo_band) != 2:
            return None
        low, high = (float(v) for v in placebo_band)
    else:
        r = float(placebo_band)
        if not math.isfinite(r) or r <= 0:
            return None
        low, high = min(r, 1 / r), max(r, 1 / r)
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or low > high:
        return None
    return low, high


def describe_speedup(ratio: float | None, placebo_band: PlaceboBand | None = None) -> str:
    """``ratio`` (original time / compressed time: above 1 is faster) in words.

    ``1.31`` -> ``"1.31x faster"``; ``0.80`` -> ``"20% slower"`` (the share of speed lost);
    a ratio that rounds to 1.00 -> ``"same speed"``. With ``placebo_band`` (see
    ``noise_band``), a ratio inside the band gets ``", within noise"``: ``"2% slower, within
    noise"``. None, zero, negative or non-finite -> ``"not measured"``.
    """
    if ratio is None or isinstance(ratio, bool):
        return "not measured"
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio <= 0:
        return "not measured"
    if ratio >= 1.0:
        text = "same speed" if f"{ratio:.2f}" == "1.00" else f"{ratio:.2f}x faster"
    else:
        lost = (1.0 - ratio) * 100.0
        text = "same speed" if round(lost) == 0 else f"{lost:.0f}% slower"
    band = noise_band(placebo_band)
    if band is not None and band[0] <= ratio <= band[1] and text != "same speed":
        text += ", within noise"
    return text
