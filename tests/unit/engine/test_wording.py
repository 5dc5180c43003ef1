"""service.engine.wording: a speed ratio in words, never "0.80x faster"."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.engine.wording import describe_speedup, noise_band


@pytest.mark.parametrize(("ratio", "words"), [
    (1.31, "1.31x faster"),
    (2.0, "2.00x faster"),
    (0.80, "20% slower"),
    (0.5, "50% slower"),
    (0.98, "2% slower"),
    (1.0, "same speed"),
    (1.004, "same speed"),
    (0.997, "same speed"),
    (None, "not measured"),
    (0.0, "not measured"),
    (-1.0, "not measured"),
    (float("nan"), "not measured"),
    (float("inf"), "not measured"),
])
def test_describe_speedup(ratio: float | None, words: str) -> None:
    assert describe_speedup(ratio) == words


def test_a_slower_model_is_never_called_faster() -> None:
    for hundredths in range(1, 100):
        text = describe_speedup(hundredths / 100)
        assert "faster" not in text, (hundredths, text)
        assert text.endswith("slower") or text == "same speed"


@pytest.mark.parametrize(("ratio", "band", "words"), [
    (0.98, 1.05, "2% slower, within noise"),     # placebo ratio: band 1/1.05 .. 1.05
    (0.98, 0.95, "2% slower, within noise"),     # the same band, measured the other way
    (1.03, 1.05, "1.03x faster, within noise"),
    (1.31, 1.05, "1.31x faster"),                # outside the band
    (0.80, 1.05, "20% slower"),
    (0.98, (0.97, 1.02), "2% slower, within noise"),
    (0.96, (0.97, 1.02), "4% slower"),
    (1.0, 1.05, "same speed"),
    (0.98, None, "2% slower"),
    (0.98, float("nan"), "2% slower"),           # an unusable band is no band
])
def test_describe_speedup_within_noise(ratio: float, band: object, words: str) -> None:
    assert describe_speedup(ratio, band) == words  # type: ignore[arg-type]


def test_noise_band() -> None:
    assert noise_band(1.25) == pytest.approx((0.8, 1.25))
    assert noise_band(0.8) == pytest.approx((0.8, 1.25))
    assert noise_band((0.9, 1.1)) == (0.9, 1.1)
    assert noise_band((1.1, 0.9)) is None
    assert noise_band(0) is None and noise_band(None) is None


def test_wording_imports_nothing_heavy() -> None:
    code = ("import sys, service.engine.wording\n"
            "print(','.join(m for m in ('numpy', 'onnx', 'onnxruntime', 'torch')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
