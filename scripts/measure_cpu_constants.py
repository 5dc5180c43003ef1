"""Measure the cost model's CPU constants that are properties of the machine, not of a fit.

Three constants of ``service/engine/devices/host.py`` and ``service/engine/cost_model.py`` are
measured here with ONNX Runtime's own CPU kernels (the ones the cost model predicts), each as
the model uses it:

- ``_GBPS_PER_CORE``: DRAM bandwidth one core draws. A chain of ``Add`` nodes over float32
  tensors far larger than the last-level cache (3 x 64 MB per node), run at 1 intra-op thread;
  bytes are counted as the cost model counts them (both inputs read, the output written once:
  ``NodeCost.bytes``; the write-allocate read the hardware adds is not counted, as in STREAM).
  The same at 2 threads shows how it scales per core. ``numpy.add`` and ``numpy.copyto`` over
  the same arrays are printed beside it as a check that does not go through ONNX Runtime.
- ``CACHE_BANDWIDTH_FACTOR["cpu"]``: the same ``Add`` chain at 1 thread on tensors whose
  working set (the chain's input, addend, two intermediates and output) fits in half of L2
  (size read from ``/sys/devices/system/cpu/cpu0/cache``), divided by the DRAM figure; an
  L3-resident size is printed for context. The model divides activation traffic by this factor.
- ``REFERENCE_KERNEL_RATE["ConvInteger"]``: the cost model prices a ``ConvInteger`` node at its
  FLOPs over ``fp32 peak x compute efficiency x rate``, and an fp32 ``Conv`` of the same shape
  at its FLOPs over ``fp32 peak x compute efficiency``; so the rate is the fp32 Conv's time over
  the ConvInteger's (uint8 activations, int8 weights, as ``quantize_dynamic`` writes it) for
  the same shape. Single-node graphs, batch 1, 3x3 and 1x1 shapes of ResNet/MobileNet-like
  sizes, sessions built by the engine's ``make_session`` (1 intra-op thread, all graph
  optimisations, as the corpus fit measures), interleaved by the engine's ``measure_latency``;
  the constant is the median over shapes. ``QLinearConv`` (the static int8 path, which the
  cost model runs at the int8 peak) is timed beside them for context.

Each chain is timed at two lengths and the time per node is the slope, so the session's fixed
cost drops out; the per-node dispatch cost (the slope on 16-element tensors) is subtracted from
the cache-resident figures, because the cost model charges it separately (``node_overhead_s``).
Values are medians over ``--reps`` interleaved samples; the spread is the lowest and highest
sample. On a shared host other processes only add time, so the spread shows the disturbance.

    .venv/bin/python scripts/measure_cpu_constants.py --out docs/bench/cpu_constants.txt
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_output import machine_header, tee_to  # noqa: E402

OPSET = 17
IR_VERSION = 8  # what every ONNX Runtime this project supports loads
DRAM_ELEMENTS = 16 * 1024 * 1024  # float32: 64 MB per tensor, twice a 32 MB L3 each
SAMPLE_SECONDS = 0.02  # one timed sample: enough runs of a chain to last about this long
# (kernel, output channels, input channels, height = width, stride): ResNet-50 stage shapes
# (3x3 and 1x1 at 56, 28, 14, 7) and a narrow MobileNet-like 1x1.
CONV_SHAPES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 64, 64, 56, 1), (3, 128, 128, 28, 1), (3, 256, 256, 14, 1), (3, 512, 512, 7, 1),
    (1, 256, 64, 56, 1), (1, 512, 128, 28, 1), (1, 1024, 256, 14, 1), (1, 64, 32, 112, 1),
)


def cache_sizes() -> dict[int, int]:
    """Data / unified cache size in bytes per level for cpu0 (sysfs), {} where unreadable."""
    out: dict[int, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        units = {"K": 1024, "M": 1024 * 1024}
        out[level] = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return out


def lscpu_lines() -> list[str]:
    """Model name, family/model and the vector / dot-product ISA flags, as ``lscpu`` says."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ["lscpu: not available"]
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    isa = [f for f in fields.get("Flags", "").split()
           if f.startswith(("avx", "fma", "f16c", "amx", "sse4", "vnni"))]
    return [f"lscpu: {fields.get('Model name', '?')}, family {fields.get('CPU family', '?')} "
            f"model {fields.get('Model', '?')}, {fields.get('Thread(s) per core', '?')} "
            f"thread(s) per core, hypervisor {fields.get('Hypervisor vendor', 'none')}",
            f"lscpu ISA flags: {' '.join(isa) or 'none'}"]


# ---------------------------------------------------------------------------------------------
# Bandwidth: chains of Add


def add_chain(elements: int, length: int) -> onnx.ModelProto:
    """``y = (((x + a) + a) ... + a)``: ``length`` Add nodes over float32 vectors."""
    nodes, previous = [], "x"
    for i in range(length):
        out = "y" if i == length - 1 else f"t{i}"
        nodes.append(helper.make_node("Add", [previous, "a"], [out]))
        previous = out
    vec = [elements]
    graph = helper.make_graph(
        nodes, "add_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, vec),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, vec)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, vec)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


class ChainRun:
    """One Add chain in an ONNX Runtime session, inputs and output bound once (no copies)."""

    def __init__(self, elements: int, length: int, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(add_chain(elements, length).SerializeToString(),
                                            sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        self.x = rng.random(elements, dtype=np.float32)
        self.a = np.full(elements, 1e-3, dtype=np.float32)
        self.y = np.empty(elements, dtype=np.float32)
        self.binding = self.session.io_binding()
        self.binding.bind_cpu_input("x", self.x)
        self.binding.bind_cpu_input("a", self.a)
        self.binding.bind_output("y", "cpu", 0, np.float32, [elements], self.y.ctypes.data)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)


def _burst(fn: Callable[[], object]) -> int:
    """Runs per sample so that one sample lasts about ``SAMPLE_SECONDS``."""
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(100_000, int(SAMPLE_SECONDS / one)))


def _sample(fn: Callable[[], object], runs: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs


def per_node_seconds(elements: int, threads: int, reps: int,
                     lengths: tuple[int, int]) -> list[float]:
    """Seconds per Add node, one value per interleaved sample pair: (t(long) - t(short)) /
    (long - short), so the fixed cost of a session run cancels."""
    short, long = (ChainRun(elements, n, threads) for n in lengths)
    bursts = (_burst(short), _burst(long))
    out = []
    for r in range(reps):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # neither length always goes first
        times = {}
        for i in order:
            times[i] = _sample((short, long)[i], bursts[i])
        out.append((times[1] - times[0]) / (lengths[1] - lengths[0]))
    return out


@dataclass
class Bandwidth:
    """Counted GB/s per sample (median first) of one kernel, size and thread count."""

    label: str
    working_set_bytes: int
    threads: int
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self) -> str:
        return (f"{self.label:<34}{self.working_set_bytes / 2**20:>10.2f}{self.threads:>8d}"
                f"{self.median:>10.1f}{min(self.samples):>9.1f}{max(self.samples):>9.1f}")


def ort_add_bandwidth(label: str, elements: int, threads: int, reps: int,
                      dispatch_s: float, lengths: tuple[int, int]) -> Bandwidth:
    counted = 3 * 4 * elements  # two float32 inputs read, one output written
    per_node = per_node_seconds(elements, threads, reps, lengths)
    gbps = [counted / max(t - dispatch_s, 1e-12) / 1e9 for t in per_node]
    # input, addend, output and the two intermediates ONNX Runtime's planner alternates between
    return Bandwidth(label, 5 * 4 * elements, threads, gbps)


def numpy_bandwidth(label: str, elements: int, reps: int, kind: str) -> Bandwidth:
    """``numpy.add(a, b, out=c)`` (3 arrays counted) or ``numpy.copyto(c, a)`` (2), one
    thread; the per-call cost measured on 16 elements is subtracted."""
    def make(n: int) -> tuple[Callable[[], object], int]:
        rng = np.random.default_rng(1)
        a, b, c = (rng.random(n, dtype=np.float32) for _ in range(3))
        if kind == "add":
            return (lambda: np.add(a, b, out=c)), 3 * 4 * n
        return (lambda: np.copyto(c, a)), 2 * 4 * n

    tiny, _ = make(16)
    big, counted = make(elements)
    bursts = (_burst(tiny), _burst(big))
    samples = []
    for _ in range(reps):
        call = _sample(tiny, bursts[0])
        samples.append(counted / max(_sample(big, bursts[1]) - call, 1e-12) / 1e9)
    arrays = 3 if kind == "add" else 2
    return Bandwidth(label, arrays * 4 * elements, 1, samples)


# ---------------------------------------------------------------------------------------------
# ConvInteger vs fp32 Conv


def _conv_model(kind: str, k: int, cout: int, cin: int, hw: int, stride: int) -> onnx.ModelProto:
    """One convolution node: ``fp32`` Conv, ``ConvInteger`` (u8 x, s8 w) or ``QLinearConv``."""
    rng = np.random.default_rng(2)
    pads = [k // 2] * 4
    attrs: dict[str, Any] = {"kernel_shape": [k, k], "pads": pads, "strides": [stride, stride]}
    x_shape = [1, cin, hw, hw]
    inits: list[onnx.TensorProto] = []
    if kind == "fp32":
        inits += [numpy_helper.from_array(rng.standard_normal((cout, cin, k, k)).astype(
                      np.float32) * 0.05, "w"),
                  numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:
        w8 = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
        inits += [numpy_helper.from_array(w8, "w"),
                  numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                  numpy_helper.from_array(np.array(0, np.int8), "wz")]
        x_type = TensorProto.UINT8
        if kind == "ConvInteger":
            node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], **attrs)
            y_type = TensorProto.INT32
        else:
            inits += [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
                      numpy_helper.from_array(np.array(0.001, np.float32), "ws"),
                      numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
                      numpy_helper.from_array(np.array(128, np.uint8), "yz")]
            node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                                    ["y"], **attrs)
            y_type = TensorProto.UINT8
    graph = helper.make_graph([node], f"{kind}_conv",
                              [helper.make_tensor_value_info("x", x_type, x_shape)],
                              [helper.make_tensor_value_info("y", y_type, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


@dataclass
class ConvRow:
    shape: tuple[int, int, int, int, int]
    gflop: float
    ms: dict[str, float]
    rate_samples: list[float]  # fp32 / ConvInteger per interleaved round

    @property
    def rate(self) -> float:
        return self.ms["fp32"] / self.ms["ConvInteger"]


def measure_convs(reps: int, workdir: Path) -> list[ConvRow]:
    from service.engine.evaluate import make_session, measure_latency

    rows = []
    for shape in CONV_SHAPES:
        k, cout, cin, hw, stride = shape
        sessions: dict[str, Any] = {}
        for kind in ("fp32", "ConvInteger", "QLinearConv"):
            path = workdir / f"{kind}_{k}_{cout}_{cin}_{hw}.onnx"
            onnx.save_model(_conv_model(kind, k, cout, cin, hw, stride), str(path))
            sessions[kind] = make_session(path, 1)
        x = np.random.default_rng(3).integers(0, 256, (1, cin, hw, hw)).astype(np.float32)
        result = measure_latency(sessions, {"x": x}, runs=reps, warmup=2)
        out_hw = (hw + 2 * (k // 2) - k) // stride + 1
        gflop = 2.0 * cout * cin * k * k * out_hw * out_hw / 1e9
        rate_samples = [f / c for f, c in zip(result["fp32"]["samples_ms"],
                                              result["ConvInteger"]["samples_ms"], strict=True)]
        rows.append(ConvRow(shape, gflop, {k_: v["median_ms"] for k_, v in result.items()},
                            rate_samples))
    return rows


# ---------------------------------------------------------------------------------------------


def two_digits(value: float) -> float:
    """Two significant digits: the samples spread by more than the third."""
    return float(f"{value:.2g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    parser.add_argument("--reps", type=int, default=21,
                        help="interleaved samples per measurement (median and range reported)")
    args = parser.parse_args(argv)
    header = machine_header(
        "scripts/measure_cpu_constants.py", argv if argv is not None else sys.argv[1:],
        "ONNX Runtime intra-op 1 (and 2 for the bandwidth scaling row), inter-op 1, "
        "sequential; numpy 1")
    header += "".join(f"# {line}\n" for line in lscpu_lines())
    caches = cache_sizes()
    header += "# caches (cpu0, sysfs): " + ", ".join(
        f"L{level} {size // 1024} KiB" for level, size in sorted(caches.items())) + "\n"
    with tee_to(args.out, header):
        return _run(args, caches)


def _run(args: argparse.Namespace, caches: dict[int, int]) -> int:
    import onnxruntime as ort

    started = time.perf_counter()
    l2 = caches.get(2, 1024 * 1024)
    l3 = caches.get(3, 32 * 1024 * 1024)
    l2_elements = l2 // 2 // (5 * 4)  # 5 chain tensors in half of L2
    l3_elements = l3 // 3 // (5 * 4)  # 5 chain tensors in a third of L3, far past L2
    if 2 * l3 > DRAM_ELEMENTS * 4:
        print(f"warning: a {DRAM_ELEMENTS * 4 >> 20} MB tensor is not far past this L3")
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}; {args.reps} samples per "
          f"measurement, each about {SAMPLE_SECONDS * 1e3:.0f} ms of runs\n")

    # dispatch cost per Add node (16 elements: no memory time), subtracted below
    dispatch = {t: statistics.median(per_node_seconds(16, t, args.reps, (1, 129)))
                for t in (1, 2)}
    print("per-node dispatch (Add chain slope on 16-element tensors): "
          + ", ".join(f"{t} thread(s) {s * 1e6:.2f} us" for t, s in dispatch.items()) + "\n")

    bw_l2 = ort_add_bandwidth("ORT Add chain, L2-resident", l2_elements, 1, args.reps,
                              dispatch[1], (1, 65))
    bw_l3 = ort_add_bandwidth("ORT Add chain, L3-resident", l3_elements, 1, args.reps,
                              dispatch[1], (1, 17))
    bw_dram = ort_add_bandwidth("ORT Add chain, DRAM", DRAM_ELEMENTS, 1, args.reps,
                                dispatch[1], (1, 5))
    bw_dram2 = ort_add_bandwidth("ORT Add chain, DRAM", DRAM_ELEMENTS, 2, args.reps,
                                 dispatch[2], (1, 5))
    np_add = numpy_bandwidth("numpy.add(a, b, out=c), DRAM", DRAM_ELEMENTS, args.reps, "add")
    np_copy = numpy_bandwidth("numpy.copyto(c, a), DRAM", DRAM_ELEMENTS, args.reps, "copy")
    np_add_l2 = numpy_bandwidth("numpy.add(a, b, out=c), L2", l2 // 2 // 12, args.reps, "add")
    print("bandwidth as the cost model counts it (bytes read + written once, per node):")
    print(f"{'kernel, working set':<34}{'set MiB':>10}{'threads':>8}{'GB/s':>10}{'min':>9}"
          f"{'max':>9}")
    for bw in (bw_l2, bw_l3, bw_dram, bw_dram2, np_add_l2, np_add, np_copy):
        print(bw.row())
    scaling = bw_dram2.median / bw_dram.median
    print(f"2 threads / 1 thread on DRAM: {scaling:.2f}x ({bw_dram2.median / 2:.1f} GB/s per "
          "core at 2 threads)\n")

    with tempfile.TemporaryDirectory(prefix="measure_cpu_constants_") as tmp:
        convs = measure_convs(args.reps, Path(tmp))
    print("convolutions, batch 1, 1 intra-op thread (engine's make_session), medians of "
          "interleaved samples:")
    print(f"{'k':>2}{'cout':>6}{'cin':>6}{'hw':>5}{'GFLOP':>8}{'fp32 ms':>10}{'ConvInt ms':>12}"
          f"{'QLinear ms':>12}{'fp32/CI':>9}{'min':>7}{'max':>7}{'fp32/QL':>9}")
    for c in convs:
        k, cout, cin, hw, _ = c.shape
        print(f"{k:>2}{cout:>6}{cin:>6}{hw:>5}{c.gflop:>8.3f}{c.ms['fp32']:>10.3f}"
              f"{c.ms['ConvInteger']:>12.3f}{c.ms['QLinearConv']:>12.3f}{c.rate:>9.3f}"
              f"{min(c.rate_samples):>7.3f}{max(c.rate_samples):>7.3f}"
              f"{c.ms['fp32'] / c.ms['QLinearConv']:>9.2f}")
    rates = [c.rate for c in convs]
    fp32_gflops = statistics.median(c.gflop / c.ms["fp32"] * 1e3 for c in convs)
    print(f"fp32 Conv median {fp32_gflops:.1f} GFLOP/s; QLinearConv / fp32 speed median "
          f"{statistics.median(c.ms['fp32'] / c.ms['QLinearConv'] for c in convs):.2f}x\n")

    gbps = two_digits(bw_dram.median)
    factor = two_digits(bw_l2.median / bw_dram.median)
    factor_lo = min(bw_l2.samples) / max(bw_dram.samples)
    factor_hi = max(bw_l2.samples) / min(bw_dram.samples)
    rate = two_digits(statistics.median(rates))
    print("measured constants (the value as the code takes it, two significant digits; spread: "
          "lowest - highest sample, or over shapes):")
    print(f"_GBPS_PER_CORE = {gbps:g} GB/s (median {bw_dram.median:.1f}, spread "
          f"{min(bw_dram.samples):.1f} - {max(bw_dram.samples):.1f}): ORT Add chain, 1 thread, "
          f"{bw_dram.working_set_bytes >> 20} MiB working set; 2 threads "
          f"{bw_dram2.median / 2:.1f} per core")
    print(f"CACHE_BANDWIDTH_FACTOR[cpu] = {factor:g} (median ratio "
          f"{bw_l2.median / bw_dram.median:.2f}, spread {factor_lo:.2f} - "
          f"{factor_hi:.2f}): ORT Add chain, 1 thread, L2-resident "
          f"{bw_l2.median:.1f} GB/s / DRAM {bw_dram.median:.1f} GB/s")
    print(f"REFERENCE_KERNEL_RATE[ConvInteger] = {rate:g} (median "
          f"{statistics.median(rates):.3f}, over shapes {min(rates):.3f} - "
          f"{max(rates):.3f}): fp32 Conv time / ConvInteger time, median of "
          f"{len(convs)} shapes, 1 thread")
    print(f"\nelapsed {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
