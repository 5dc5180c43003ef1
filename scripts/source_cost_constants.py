"""Derive the cost model's GPU / NPU constants from published latencies and print the fit.

No GPU or NPU is at hand to measure on, so the constants of those targets are fitted to
latencies that vendors and third parties published for standard networks at batch 1 (each with
its URL and the figure as it appears, in ``service/engine/devices/cost_sources.json`` under
``measurements``). For every measurement this script builds the network's graph in ONNX
(architecture only: ResNet-18/50/101, ResNeXt-50 32x4d, MobileNet v1 and v2, VGG-13 at
224x224, in float32, float16 or int8 QDQ; the weights are zeros, which the cost model never
reads), runs the
cost model's own ``analyse`` and roofline on the device's profile, and fits per device

- ``compute_efficiency`` (log grid, then a finer one), and
- ``node_overhead_s`` in closed form (least squares, non-negative) where the device has at least
  three measurements; with fewer it keeps the kind default (an ASSUMPTION); ``fit`` in the
  sources file may name other parameters for a device, or none (listed, not fitted),

minimising the squared relative error; memory efficiency and the cache factor keep their kind
defaults (the published numbers are end-to-end latencies of compute-heavy CNNs and do not
separate the memory term). The GPU kind's two are derived first, from the bandwidth
microbenchmarks under ``bandwidth`` in the same file: the median STREAM-triad fraction of the
datasheet bandwidth, and the median L2 / DRAM bandwidth ratio within one run. The NPU kind's
memory efficiency comes from published LLM decode rates (``llm_decode``): per Snapdragon NPU,
the slope of seconds per token against bytes per token over Llama models of three sizes, over
the datasheet bandwidth, the median of the devices. Its cache factor is then fitted jointly to
all NPU latencies (each device's own constants refitted for every candidate), and its compute
efficiency and per-node overhead are derived last, from the NPU profiles' fits (median;
geometric mean). It prints per measurement the model's FLOPs, the naive achieved
efficiency (FLOPs x throughput / datasheet peak, overheads included), the estimate with the
module defaults and with the fitted constants, and the fit error per device.

    .venv/bin/python scripts/source_cost_constants.py --out docs/bench/cost_sources.txt

``--check`` compares the fitted values with the ones stored in ``cost_sources.json`` and the
profiles and exits non-zero when they drift (to within the stored rounding).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_output import machine_header, tee_to  # noqa: E402

from service.engine import cost_model  # noqa: E402
from service.engine.devices import DeviceProfile, get_device  # noqa: E402

SOURCES = ROOT / "service" / "engine" / "devices" / "cost_sources.json"


class GraphBuilder:
    """Accumulates the nodes and initializers of one CNN in one of three numeric formats.

    ``fmt``: ``fp32``; ``fp16`` (every tensor half precision); ``int8`` (QDQ: every Conv / Gemm
    reads its activation through QuantizeLinear -> DequantizeLinear and an int8 weight through
    DequantizeLinear, s8s8 as TensorRT's explicit quantization wants); ``int8_u8s8`` (the same
    with uint8 activations, as QNN's HTP runs them).
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.dequantized: set[str] = set()
        self.elem = TensorProto.FLOAT16 if fmt == "fp16" else TensorProto.FLOAT
        self.np_float = np.float16 if fmt == "fp16" else np.float32

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _weight(self, shape: tuple[int, ...]) -> str:
        name = self._name("w")
        if self.fmt.startswith("int8"):
            self.inits.append(numpy_helper.from_array(np.zeros(shape, np.int8), name + "_q"))
            self._scales(name)
            self.nodes.append(helper.make_node("DequantizeLinear",
                                               [name + "_q", name + "_s", name + "_z"], [name]))
        else:
            self.inits.append(numpy_helper.from_array(np.zeros(shape, self.np_float), name))
        return name

    def _scales(self, name: str, activation: bool = False) -> None:
        zero = np.uint8(128) if activation and self.fmt == "int8_u8s8" else np.int8(0)
        self.inits.append(numpy_helper.from_array(np.array(0.01, np.float32), name + "_s"))
        self.inits.append(numpy_helper.from_array(np.array(zero), name + "_z"))

    def _bias(self, size: int) -> str:
        """A float bias, or (int8) an int32 bias through DequantizeLinear, as ONNX Runtime's
        static quantization writes it."""
        name = self._name("b")
        if not self.fmt.startswith("int8"):
            self.inits.append(numpy_helper.from_array(np.zeros((size,), self.np_float), name))
            return name
        self.inits.append(numpy_helper.from_array(np.zeros((size,), np.int32), name + "_q"))
        self.inits.append(numpy_helper.from_array(np.array(1e-4, np.float32), name + "_s"))
        self.inits.append(numpy_helper.from_array(np.array(0, np.int32), name + "_z"))
        self.nodes.append(helper.make_node("DequantizeLinear",
                                           [name + "_q", name + "_s", name + "_z"], [name]))
        return name

    def _activation(self, x: str) -> str:
        """``x`` as the int8 kernels read it: through Q -> DQ (once per tensor)."""
        if not self.fmt.startswith("int8") or x in self.dequantized:
            return x
        name = self._name("a")
        self.dequantized.add(name)
        self._scales(name, activation=True)
        self.nodes.append(helper.make_node("QuantizeLinear", [x, name + "_s", name + "_z"],
                                           [name + "_q"]))
        self.nodes.append(helper.make_node("DequantizeLinear",
                                           [name + "_q", name + "_s", name + "_z"], [name]))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             act: str | None = "Relu") -> str:
        w = self._weight((cout, cin // group, k, k))
        bias = self._bias(cout)
        y = self._name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [self._activation(x), w, bias], [y], kernel_shape=[k, k],
            strides=[stride, stride], pads=[k // 2] * 4, group=group))
        if self.fmt.startswith("int8"):
            # ONNX Runtime's QDQ quantizer folds a Relu / Clip after a Conv into the output's
            # quantization range: Conv -> Q -> DQ
            return self._activation(y)
        if act == "Relu":
            out = self._name("relu")
            self.nodes.append(helper.make_node("Relu", [y], [out]))
            return out
        if act == "Relu6":
            lo, hi = self._name("lo"), self._name("hi")
            self.inits.append(numpy_helper.from_array(np.array(0.0, self.np_float), lo))
            self.inits.append(numpy_helper.from_array(np.array(6.0, self.np_float), hi))
            out = self._name("relu6")
            self.nodes.append(helper.make_node("Clip", [y, lo, hi], [out]))
            return out
        return y

    def add(self, a: str, b: str, relu: bool) -> str:
        y = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [y]))
        if self.fmt.startswith("int8"):
            return self._activation(y)
        if not relu:
            return y
        out = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [y], [out]))
        return out

    def maxpool(self, x: str) -> str:
        y = self._name("pool")
        self.nodes.append(helper.make_node("MaxPool", [x], [y], kernel_shape=[3, 3],
                                           strides=[2, 2], pads=[1, 1, 1, 1]))
        return self._activation(y)

    def fc(self, x: str, cin: int, cout: int, out: str | None = None) -> str:
        """A Gemm layer, ReLU after it unless it is the output (``out``)."""
        w = self._weight((cout, cin))
        bias = self._bias(cout)
        y = out or self._name("fc")
        self.nodes.append(helper.make_node("Gemm", [self._activation(x), w, bias], [y],
                                           transB=1))
        if out is not None:
            return y
        if self.fmt.startswith("int8"):
            return self._activation(y)
        relu = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [y], [relu]))
        return relu

    def head(self, x: str, channels: int, classes: int = 1000) -> str:
        pooled, flat = self._name("gap"), self._name("flat")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
        pooled_q = self._activation(pooled)
        self.nodes.append(helper.make_node("Flatten", [pooled_q], [flat]))
        return self.fc(flat, channels, classes, out="logits")

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info("x", self.elem, [1, 3, 224, 224])],
            [helper.make_tensor_value_info("logits", self.elem, [1, 1000])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def _resnet(blocks: list[int], bottleneck: bool = True, groups: int = 1,
            width_per_group: int = 64) -> Callable[[str], onnx.ModelProto]:
    """ResNet v1.5 (stride on the 3x3) with bottleneck blocks (ResNeXt with ``groups``) or basic
    blocks (two 3x3 convolutions: ResNet-18 / 34), no BatchNorm (folded)."""

    def build(fmt: str) -> onnx.ModelProto:
        g = GraphBuilder(fmt)
        x = g.maxpool(g.conv("x", 3, 64, 7, stride=2))
        cin = 64
        for stage, count in enumerate(blocks):
            planes = 64 * 2 ** stage
            width = int(planes * width_per_group / 64) * groups
            cout = planes * 4 if bottleneck else planes
            for index in range(count):
                stride = 2 if index == 0 and stage > 0 else 1
                if bottleneck:
                    h = g.conv(x, cin, width, 1)
                    h = g.conv(h, width, width, 3, stride=stride, group=groups)
                    h = g.conv(h, width, cout, 1, act=None)
                else:
                    h = g.conv(x, cin, cout, 3, stride=stride)
                    h = g.conv(h, cout, cout, 3, act=None)
                short = g.conv(x, cin, cout, 1, stride=stride, act=None) \
                    if stride != 1 or cin != cout else x
                x = g.add(h, short, relu=True)
                cin = cout
        g.head(x, cin)
        return g.model("resnet")

    return build


def _mobilenet_v1(fmt: str) -> onnx.ModelProto:
    g = GraphBuilder(fmt)
    x = g.conv("x", 3, 32, 3, stride=2)
    cin = 32
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + \
            [(512, 1)] * 5 + [(1024, 2), (1024, 1)]:
        x = g.conv(x, cin, cin, 3, stride=stride, group=cin)
        x = g.conv(x, cin, cout, 1)
        cin = cout
    g.head(x, cin)
    return g.model("mobilenet_v1")


def _vgg(layers: list[int | str]) -> Callable[[str], onnx.ModelProto]:
    """VGG: 3x3 convolutions and 2x pooling, then 512x7x7 -> 4096 -> 4096 -> 1000."""

    def build(fmt: str) -> onnx.ModelProto:
        g = GraphBuilder(fmt)
        x, cin = "x", 3
        for layer in layers:
            if layer == "M":
                x = g.maxpool(x)
            else:
                x = g.conv(x, cin, int(layer), 3)
                cin = int(layer)
        flat = g._name("flat")
        g.nodes.append(helper.make_node("Flatten", [x], [flat]))
        x = g.fc(flat, cin * 7 * 7, 4096)
        x = g.fc(x, 4096, 4096)
        g.fc(x, 4096, 1000, out="logits")
        return g.model("vgg")

    return build


def _divisible(channels: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: to a multiple of ``divisor``, never 10 % below."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _mobilenet_v2_net(multiplier: float = 1.0) -> Callable[[str], onnx.ModelProto]:
    """MobileNet v2 at a width multiplier (channels rounded to multiples of 8; the last
    convolution keeps 1280 channels below 1.0, as timm's mobilenetv2_050 does)."""

    def build(fmt: str) -> onnx.ModelProto:
        g = GraphBuilder(fmt)
        stem = _divisible(32 * multiplier)
        x = g.conv("x", 3, stem, 3, stride=2, act="Relu6")
        cin = stem
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
            c = _divisible(c * multiplier)
            for index in range(n):
                stride = s if index == 0 else 1
                hidden = cin * t
                h = g.conv(x, cin, hidden, 1, act="Relu6") if t != 1 else x
                h = g.conv(h, hidden, hidden, 3, stride=stride, group=hidden, act="Relu6")
                h = g.conv(h, hidden, c, 1, act=None)
                x = g.add(h, x, relu=False) if stride == 1 and cin == c else h
                cin = c
        last = max(1280, _divisible(1280 * multiplier))
        x = g.conv(x, cin, last, 1, act="Relu6")
        g.head(x, last)
        return g.model("mobilenet_v2")

    return build


NETWORKS: dict[str, Callable[[str], onnx.ModelProto]] = {
    "resnet50": _resnet([3, 4, 6, 3]),
    "resnet101": _resnet([3, 4, 23, 3]),
    "resnext50_32x4d": _resnet([3, 4, 6, 3], groups=32, width_per_group=4),
    "mobilenet_v1": _mobilenet_v1,
    "mobilenet_v2": _mobilenet_v2_net(1.0),
    "mobilenet_v2_050": _mobilenet_v2_net(0.5),
    "resnet18": _resnet([2, 2, 2, 2], bottleneck=False),
    "vgg13": _vgg([64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]),
}


def load_sources() -> dict:
    return json.loads(SOURCES.read_text(encoding="utf-8"))


GRID_PARAMS = ("compute_efficiency", "memory_efficiency", "cache_bandwidth_factor")
GRID_RANGE = {"compute_efficiency": (0.003, 1.0), "memory_efficiency": (0.05, 1.0),
              "cache_bandwidth_factor": (1.0, 32.0)}


def _constants(profile: DeviceProfile, values: dict[str, float]) -> cost_model.Constants:
    base = cost_model.Constants.defaults(profile.kind)
    return cost_model.Constants(
        values.get("compute_efficiency", base.compute_efficiency),
        values.get("memory_efficiency", base.memory_efficiency),
        values.get("cache_bandwidth_factor", base.cache_bandwidth_factor),
        values.get("node_overhead_s", base.node_overhead_s), base.reference_kernel_rate)


@functools.cache
def network_cost(model: str, precision: str) -> cost_model.ModelCost:
    """The cost model's analysis of reference network ``model`` built in ``precision`` (built
    and analysed once per run)."""
    return cost_model.analyse(NETWORKS[model](precision))


def _seconds(cost: cost_model.ModelCost, profile: DeviceProfile, values: dict[str, float]) -> float:
    """The estimate in seconds with the kind defaults, ``values`` replacing some."""
    return cost_model.latency_s(cost, profile, _constants(profile, values))


def fit_device(costs: list[cost_model.ModelCost], measured_s: np.ndarray,
               profile: DeviceProfile, params: list[str],
               fixed: dict[str, float] | None = None) -> tuple[dict[str, float], np.ndarray]:
    """The ``params`` minimising the squared relative error (log grids, then two finer ones;
    ``node_overhead_s`` in closed form, non-negative); ``fixed`` sets others, the rest keep the
    kind defaults."""
    grid_params = [p for p in GRID_PARAMS if p in params]
    fit_overhead = "node_overhead_s" in params

    def solve(point: tuple[float, ...]) -> tuple[float, float, np.ndarray]:
        values = {**(fixed or {}), **dict(zip(grid_params, point, strict=True))}
        k = _constants(profile, values)
        roof, nodes = np.zeros(len(costs)), np.zeros(len(costs))
        for i, cost in enumerate(costs):
            roof[i], nodes[i], *_ = cost_model._roofline(cost, profile, k)
        overhead = k.node_overhead_s
        if fit_overhead:
            a, b = nodes / measured_s, 1.0 - roof / measured_s
            overhead = max(0.0, float(a @ b / (a @ a)))
        pred = roof + overhead * nodes
        return float(np.sum(((pred - measured_s) / measured_s) ** 2)), overhead, pred

    def search(axes: list[np.ndarray]) -> tuple[float, ...]:
        best: tuple[float, tuple[float, ...]] = (math.inf, ())
        for point in itertools.product(*axes):
            loss = solve(tuple(float(v) for v in point))[0]
            if loss < best[0]:
                best = (loss, tuple(float(v) for v in point))
        return best[1]

    steps = 40 if len(grid_params) == 1 else 16
    point = search([np.geomspace(*GRID_RANGE[p], steps) for p in grid_params])
    for width in (1.3, 1.05):
        point = search([np.clip(v * np.geomspace(1 / width, width, 9), *GRID_RANGE[p])
                        for p, v in zip(grid_params, point, strict=True)])
    _, overhead, pred = solve(point)
    values = dict(zip(grid_params, point, strict=True))
    if fit_overhead:
        values["node_overhead_s"] = overhead
    return values, pred


def fit_params(sources: dict, device: str, samples: int) -> list[str]:
    """What is fitted per device: as ``fit`` in the sources file says, else compute efficiency,
    with the per-node overhead too from three latencies on."""
    if device in sources["fit"]:
        return list(sources["fit"][device])
    return ["compute_efficiency", "node_overhead_s"] if samples >= 3 else ["compute_efficiency"]


def device_measurements(rows: list[dict]) -> tuple[list[cost_model.ModelCost], np.ndarray]:
    """The cost model's analyses of one device's measured networks and their latencies (s)."""
    return ([network_cost(r["model"], r["precision"]) for r in rows],
            np.array([float(r["latency_ms"]) for r in rows]) * 1e-3)


def run(out_json: dict | None = None) -> dict[str, dict]:
    sources = load_sources()
    by_device: dict[str, list[dict]] = {}
    for row in sources["measurements"]:
        by_device.setdefault(row["device"], []).append(row)
    results: dict[str, dict] = {}
    print(f"{'device':20s} {'model':16s} {'prec':5s} {'GFLOP':>6s} {'meas ms':>8s} "
          f"{'naive eff':>9s} {'default ms':>10s} {'fit ms':>7s} {'err%':>6s}")
    print("(naive eff: FLOPs x throughput / datasheet peak; default ms: the estimate with the "
          "kind defaults; fit ms: with the fitted constants)")
    for device, rows in by_device.items():
        profile = get_device(device)
        costs, measured = device_measurements(rows)
        params = fit_params(sources, device, len(rows))
        defaults = [_seconds(c, profile, {}) * 1e3 for c in costs]
        if params:
            values, pred = fit_device(costs, measured, profile, params)
        else:  # listed for the record, not fitted (``not_fitted`` says why)
            values, pred = {}, np.array(defaults) * 1e-3
        errors = []
        for row, cost, p, d in zip(rows, costs, pred, defaults, strict=True):
            precision = "int8" if row["precision"].startswith("int8") else row["precision"]
            peak = profile.peak(precision if precision in profile.precisions else "fp32") * 1e9
            naive = cost.flops / (float(row["latency_ms"]) * 1e-3) / peak
            err = 100.0 * (p * 1e3 - row["latency_ms"]) / row["latency_ms"]
            errors.append(abs(err))
            print(f"{device:20s} {row['model']:16s} {row['precision']:5s} "
                  f"{cost.flops / 1e9:6.2f} {row['latency_ms']:8.3f} {naive:9.4f} "
                  f"{d:10.3f} {p * 1e3:7.3f} {err:6.1f}")
        results[device] = {
            "kind": profile.kind,
            "fitted": {k: float(f"{v:.3g}") for k, v in values.items()},
            "samples": len(rows),
            "median_abs_error_pct": round(statistics.median(errors), 1),
            "max_abs_error_pct": round(max(errors), 1),
        }
    print()
    for device, r in results.items():
        if not r["fitted"]:
            print(f"{device}: not fitted (its rows show the estimate with the defaults): "
                  f"{sources['not_fitted'][device]}")
            continue
        fitted = ", ".join(f"{k} {v:.3g}" for k, v in r["fitted"].items())
        exact = " (as many parameters as latencies: no residual to judge it by)" \
            if len(r["fitted"]) >= r["samples"] else ""
        print(f"{device}: {fitted}; median |error| {r['median_abs_error_pct']} % (max "
              f"{r['max_abs_error_pct']} %) over {r['samples']} published latencies{exact}")
    return results


def bandwidth_defaults() -> dict[str, float]:
    """The GPU kind's memory efficiency and cache factor from the microbenchmarks under
    ``bandwidth`` in the sources file (median triad / datasheet peak; median L2 / DRAM within
    one run), printing one row per GPU."""
    rows = load_sources()["bandwidth"]["gpus"]
    print(f"{'GPU':22s} {'peak GB/s':>9s} {'triad GB/s':>10s} {'triad/peak':>10s} "
          f"{'L2 4MB GB/s':>11s} {'DRAM 256MB':>10s} {'L2/DRAM':>7s}")
    fractions, ratios = [], []
    for g in rows:
        fraction = g["triad_gbps"] / g["peak_gbps"] if g.get("triad_gbps") and g.get(
            "peak_gbps") else None
        ratio = g["l2_gbps"] / g["dram_gbps"] if g.get("l2_gbps") else None
        if fraction is not None:
            fractions.append(fraction)
        if ratio is not None:
            ratios.append(ratio)

        def cell(value: float | None, width: int, fmt: str) -> str:
            return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}s}"

        print(f"{g['gpu']:22s} {cell(g.get('peak_gbps'), 9, '.0f')} "
              f"{cell(g.get('triad_gbps'), 10, '.1f')} {cell(fraction, 10, '.3f')} "
              f"{cell(g.get('l2_gbps'), 11, '.1f')} {cell(g.get('dram_gbps'), 10, '.1f')} "
              f"{cell(ratio, 7, '.2f')}")
    derived = {"memory_efficiency": round(statistics.median(fractions), 2),
               "cache_bandwidth_factor": round(statistics.median(ratios), 1)}
    print(f"gpu memory_efficiency: median triad/peak {statistics.median(fractions):.4f} over "
          f"{len(fractions)} GPUs (range {min(fractions):.3f}-{max(fractions):.3f}) -> "
          f"{derived['memory_efficiency']}")
    print(f"gpu cache_bandwidth_factor: median L2/DRAM {statistics.median(ratios):.4f} over "
          f"{len(ratios)} GPUs (range {min(ratios):.2f}-{max(ratios):.2f}) -> "
          f"{derived['cache_bandwidth_factor']}")
    print()
    return derived


def decode_bytes(model: dict, bracket: dict, context: int) -> float:
    """Bytes one LLM decode step reads: every layer's q, k, v, o and three MLP matrices, the
    output projection and the K and V caches at ``context`` tokens, at the ``bracket``'s widths
    (the embedding lookup reads one row and is left out)."""
    q_dim, kv_dim = model["heads"] * model["head_dim"], model["kv_heads"] * model["head_dim"]
    per_layer = 2 * model["hidden"] * q_dim + 2 * model["hidden"] * kv_dim \
        + 3 * model["hidden"] * model["intermediate"]
    return (model["layers"] * per_layer * bracket["weight_bits"]
            + model["vocab"] * model["hidden"] * bracket["output_bits"]
            + model["layers"] * 2 * kv_dim * context * bracket["kv_bits"]) / 8


def decode_bandwidth(bytes_per_token: list[float], seconds_per_token: list[float]
                     ) -> tuple[float, float]:
    """Least-squares line seconds = fixed + bytes / bandwidth over one device's models:
    (bandwidth in bytes/s, fixed seconds per token)."""
    design = np.vstack([np.ones(len(bytes_per_token)), np.array(bytes_per_token)]).T
    (fixed, slope), *_ = np.linalg.lstsq(design, np.array(seconds_per_token), rcond=None)
    return 1.0 / float(slope), float(fixed)


def npu_memory_efficiency() -> dict[str, float]:
    """The NPU kind's memory efficiency from published LLM decode rates (``llm_decode`` in the
    sources file): per device the bandwidth of the bytes-per-token line over its datasheet peak,
    at both ends of the bytes bracket; the kind default is the median of the devices' midpoints
    (printed)."""
    data = load_sources()["llm_decode"]
    models, brackets, context = data["models"], data["brackets"], data["context_length"]
    print(f"{'NPU (LLM decode, w4a16)':28s} {'model':13s} {'tok/s':>7s} {'ms/tok':>7s} "
          + " ".join(f"{'GB ' + b:>8s}" for b in brackets))
    middles = []
    for device in data["devices"]:
        seconds = [1.0 / r["tokens_per_second"] for r in device["rates"]]
        for r, t in zip(device["rates"], seconds, strict=True):
            print(f"{device['device']:28s} {r['model']:13s} {r['tokens_per_second']:7.2f} "
                  f"{t * 1e3:7.2f} " + " ".join(
                      f"{decode_bytes(models[r['model']], b, context) / 1e9:8.3f}"
                      for b in brackets.values()))
        fractions = []
        for name, bracket in brackets.items():
            bandwidth, fixed = decode_bandwidth(
                [decode_bytes(models[r["model"]], bracket, context) for r in device["rates"]],
                seconds)
            fractions.append(bandwidth / 1e9 / device["peak_gbps"])
            print(f"{'':28s} {name}: {bandwidth / 1e9:.1f} GB/s of {device['peak_gbps']:g} "
                  f"peak = {fractions[-1]:.3f}, fixed {fixed * 1e3:.2f} ms per token")
        middles.append((min(fractions) + max(fractions)) / 2)
    derived = {"memory_efficiency": round(statistics.median(middles), 2)}
    print(f"npu memory_efficiency: median of {len(middles)} devices' bracket midpoints "
          f"({', '.join(f'{m:.3f}' for m in middles)}) -> {derived['memory_efficiency']}")
    print()
    return derived


CACHE_GRID = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0)


def npu_cache_factor(memory_efficiency: float) -> dict[str, float]:
    """The NPU kind's cache factor, fitted jointly to every NPU's published latencies: for each
    candidate factor each device's own constants are fitted (as ``run`` fits them, memory
    efficiency held at ``memory_efficiency``) and the factor with the least summed squared
    relative error over all latencies wins (grid, then a finer one around the best); the devices'
    rms errors per candidate are printed."""
    sources = load_sources()
    by_device: dict[str, list[dict]] = {}
    for row in sources["measurements"]:
        if get_device(row["device"]).kind == "npu":
            by_device.setdefault(row["device"], []).append(row)
    devices = {device: (get_device(device), *device_measurements(rows),
                        fit_params(sources, device, len(rows)))
               for device, rows in by_device.items()}

    def errors(factor: float) -> dict[str, np.ndarray]:
        out = {}
        for device, (profile, costs, measured, params) in devices.items():
            _, pred = fit_device(costs, measured, profile, params,
                                 {"memory_efficiency": memory_efficiency,
                                  "cache_bandwidth_factor": factor})
            out[device] = (pred - measured) / measured
        return out

    def loss(e: dict[str, np.ndarray]) -> float:
        return float(sum(np.sum(v ** 2) for v in e.values()))

    print(f"npu cache_bandwidth_factor: rms |error| % per device with each factor held "
          f"(memory efficiency {memory_efficiency:g}; each device's own constants refitted)")
    print(f"{'factor':>7s}" + "".join(f"{d:>22s}" for d in devices) + f"{'all':>8s}")
    grid = {factor: errors(factor) for factor in CACHE_GRID}
    for factor, e in grid.items():
        print(f"{factor:7g}" + "".join(f"{np.sqrt(np.mean(v ** 2)) * 100:22.2f}"
                                       for v in e.values())
              + f"{np.sqrt(np.mean(np.concatenate(list(e.values())) ** 2)) * 100:8.2f}")
    coarse = min(grid, key=lambda f: loss(grid[f]))
    fine = {float(f): errors(float(f))
            for f in np.clip(coarse * np.geomspace(1 / 1.25, 1.25, 11), 1.0, 32.0)}
    best = min(fine, key=lambda f: loss(fine[f]))
    derived = {"cache_bandwidth_factor": float(f"{best:.3g}")}
    count = sum(len(r) for r in by_device.values())
    print(f"npu cache_bandwidth_factor: least summed squared error over {count} latencies of "
          f"{len(devices)} NPUs (rms {math.sqrt(loss(fine[best]) / count) * 100:.2f} %) at "
          f"{best:.3f} -> {derived['cache_bandwidth_factor']}")
    print()
    return derived


SENSITIVITY_MEMORY = (0.2, 0.3, 0.45, 0.6, 0.72, 0.9, 1.0)
SENSITIVITY_CACHE = (1.0, 2.0, 4.0, 8.0)


def sensitivity(device: str) -> dict[tuple[float, float], float]:
    """RMS relative error (%) of ``device``'s fit of compute efficiency and per-node overhead
    with memory efficiency and the cache factor held at each point of a grid: how far its
    published latencies determine those two (printed)."""
    sources = load_sources()
    profile = get_device(device)
    costs, measured = device_measurements(
        [r for r in sources["measurements"] if r["device"] == device])
    table: dict[tuple[float, float], float] = {}
    for memory in SENSITIVITY_MEMORY:
        for cache in SENSITIVITY_CACHE:
            _, pred = fit_device(costs, measured, profile,
                                 ["compute_efficiency", "node_overhead_s"],
                                 {"memory_efficiency": memory, "cache_bandwidth_factor": cache})
            table[(memory, cache)] = float(np.sqrt(np.mean(((pred - measured) / measured) ** 2))
                                           * 100)
    print(f"{device}: rms |error| % of the compute-efficiency + overhead fit with memory "
          "efficiency (rows) and cache factor (columns) held")
    print(f"{'':>6s}" + "".join(f"{c:>8g}" for c in SENSITIVITY_CACHE))
    for memory in SENSITIVITY_MEMORY:
        print(f"{memory:>6g}" + "".join(f"{table[(memory, c)]:8.2f}" for c in SENSITIVITY_CACHE))
    print()
    return table


def npu_defaults(results: dict[str, dict]) -> dict[str, float]:
    """The NPU kind's compute efficiency (median of the NPU profiles' fits) and per-node
    overhead (geometric mean of the NPU fits that determine it: they span orders of
    magnitude, as the runtimes differ), printed."""
    npus = [r["fitted"] for r in results.values() if r["kind"] == "npu" and r["fitted"]]
    efficiencies = [f["compute_efficiency"] for f in npus if "compute_efficiency" in f]
    overheads = [f["node_overhead_s"] for f in npus if "node_overhead_s" in f]
    derived = {"compute_efficiency": float(f"{statistics.median(efficiencies):.3g}"),
               "node_overhead_s": float(f"{statistics.geometric_mean(overheads):.3g}")}
    print(f"npu compute_efficiency: median of {len(efficiencies)} NPU fits "
          f"({', '.join(f'{v:.3g}' for v in sorted(efficiencies))}) -> "
          f"{derived['compute_efficiency']}")
    print(f"npu node_overhead_s: geometric mean of {len(overheads)} NPU fits "
          f"({', '.join(f'{v:.3g}' for v in sorted(overheads))}) -> {derived['node_overhead_s']}")
    return derived


def check_kind(kind: str, derived: dict[str, float]) -> list[str]:
    """Where the ``kind`` defaults in cost_model.py or the sources file differ from
    ``derived`` (beyond 3 % relative)."""
    problems = []
    tables = {"memory_efficiency": cost_model.MEMORY_EFFICIENCY,
              "cache_bandwidth_factor": cost_model.CACHE_BANDWIDTH_FACTOR,
              "compute_efficiency": cost_model.COMPUTE_EFFICIENCY,
              "node_overhead_s": cost_model.NODE_OVERHEAD_S}
    stored = {(r["key"], r["constant"].lower()): r for r in load_sources()["constants"]}
    for constant, value in derived.items():
        if not math.isclose(tables[constant][kind], value, rel_tol=0.03):
            problems.append(f"{kind}.{constant}: cost_model.py {tables[constant][kind]}, "
                            f"derived {value}")
        row = stored.get((kind, constant))
        if row is None or not math.isclose(row["value"], value, rel_tol=0.03):
            problems.append(f"{kind}.{constant}: {SOURCES.name} "
                            f"{row and row['value']}, derived {value}")
    return problems


def check(results: dict[str, dict]) -> list[str]:
    """Where the stored per-device values differ from this fit (beyond 3 % relative)."""
    problems = []
    stored = {(r["key"], r["constant"].lower()): r for r in load_sources()["constants"]}
    for device, r in results.items():
        profile_values = get_device(device).cost_constants
        for constant, value in r["fitted"].items():
            row = stored.get((device, constant))
            if row is None:
                problems.append(f"{device}.{constant}: no row in {SOURCES.name}")
                continue
            if not math.isclose(row["value"], value, rel_tol=0.03):
                problems.append(f"{device}.{constant}: stored {row['value']}, fit {value}")
            if profile_values.get(constant) != row["value"]:
                problems.append(f"{device}.{constant}: profile and {SOURCES.name} disagree")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the printed table here")
    parser.add_argument("--check", action="store_true",
                        help="fail when the stored values differ from the fit")
    args = parser.parse_args()
    header = machine_header("scripts/source_cost_constants.py", sys.argv[1:],
                            "none (no inference is run: the cost model's arithmetic only)")
    with tee_to(args.out, header):
        derived = bandwidth_defaults()
        npu_memory = npu_memory_efficiency()
        npu_cache = npu_cache_factor(npu_memory["memory_efficiency"])
        results = run()
        npu = {**npu_memory, **npu_cache, **npu_defaults(results)}
        print()
        sensitivity("intel_core_ultra_npu")
        problems = check(results) + check_kind("gpu", derived) + check_kind("npu", npu) \
            if args.check else []
        for problem in problems:
            print("DRIFT:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
