"""Measure the cost model's CPU constants that are properties of the machine, not of a fit.

Three constants of ``service/engine/devices/host.py`` and ``service/engine/cost_model.py`` are
measured here with ONNX Runtime's own CPU kernels (the ones the cost model predicts), each as
the model uses it:

- ``_GBPS_PER_CORE``: DRAM bandwidth one core draws. An ``Add`` node over float32 tensors far
  larger than the last-level cache (two 64 MB inputs, a 64 MB output), 1 intra-op thread;
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
  the constant is the median over shapes of the per-shape rate. ``QLinearConv`` (the static
  int8 path, which the cost model runs at the int8 peak) is timed beside them for context.

Each chain (of 65 nodes for L2, 17 for L3, 1 for DRAM, so that one run is long enough to time
and as short as possible) is timed against the same chain on 16-element tensors and the
difference is the memory time: the session's fixed cost and the per-node dispatch, which the
cost model charges separately (``node_overhead_s``), drop out.
Each figure is taken from the fastest of ``--reps`` interleaved samples (STREAM's convention,
its "best rate": on a shared host other processes only ever add time, and the fastest samples
agree from run to run where the medians do not); the median and range over interleaved
samples are printed beside it and show how disturbed the host was.

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
SAMPLE_SECONDS = 0.003  # one timed sample: enough runs to last about this long (at least one);
# short, so that on a shared host some samples fall between two time slices of other processes
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


@dataclass
class Bandwidth:
    """One kernel, working set and thread count: interleaved samples of the time per run of
    ``nodes`` nodes (or calls) on 16 elements (``base_s``) and on the measured size
    (``run_s``); their difference is memory time only (the fixed cost of a run and the
    per-node dispatch are the same in both). Bytes are counted as the cost model does."""

    label: str
    working_set_bytes: int
    threads: int
    counted_bytes: int  # per node
    nodes: int
    base_s: list[float]
    run_s: list[float]

    def _gbps(self, base: float, run: float) -> float:
        return self.counted_bytes / max((run - base) / self.nodes, 1e-12) / 1e9

    @property
    def best(self) -> float:
        """From the fastest sample of each: other processes only ever add time."""
        return self._gbps(min(self.base_s), min(self.run_s))

    @property
    def samples(self) -> list[float]:
        """One figure per interleaved pair of samples (a pair whose base sample was slowed
        more than the run itself says nothing and is left out)."""
        return [self._gbps(b, r) for b, r in zip(self.base_s, self.run_s, strict=True) if r > b]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self) -> str:
        return (f"{self.label:<34}{self.working_set_bytes / 2**20:>10.2f}{self.threads:>8d}"
                f"{self.nodes:>6d}{self.best:>9.1f}{self.median:>9.1f}{min(self.samples):>9.1f}"
                f"{max(self.samples):>9.1f}")


def interleaved(first: Callable[[], object], second: Callable[[], object],
                reps: int) -> tuple[list[float], list[float]]:
    """Seconds per call of each, ``reps`` samples of about ``SAMPLE_SECONDS`` each, the two
    alternating (and alternating which goes first)."""
    calls = (first, second)
    bursts = (_burst(first), _burst(second))
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(reps):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(_sample(calls[i], bursts[i]))
    return times


def dispatch_seconds(threads: int, reps: int) -> float:
    """Per-node cost of an Add on 16 elements (no memory time): the slope from a 1-node to a
    129-node chain, fastest samples."""
    short, long = interleaved(ChainRun(16, 1, threads), ChainRun(16, 129, threads), reps)
    return (min(long) - min(short)) / 128


def ort_add_bandwidth(label: str, elements: int, threads: int, reps: int,
                      length: int) -> Bandwidth:
    """An Add chain of ``length`` nodes on ``elements`` floats against the same chain on 16."""
    base, run = interleaved(ChainRun(16, length, threads), ChainRun(elements, length, threads),
                            reps)
    # the working set: input, addend, output and (in a chain of 3 or more) the two
    # intermediates ONNX Runtime's planner alternates between; counted per node: two float32
    # inputs read, one output written
    tensors = min(length + 2, 5)
    return Bandwidth(label, tensors * 4 * elements, threads, 3 * 4 * elements, length, base,
                     run)


def numpy_bandwidth(label: str, elements: int, reps: int, kind: str) -> Bandwidth:
    """``numpy.add(a, b, out=c)`` (3 arrays counted) or ``numpy.copyto(c, a)`` (2), one
    thread; the per-call cost (the same call on 16 elements) is subtracted."""
    def make(n: int) -> Callable[[], object]:
        rng = np.random.default_rng(1)
        a, b, c = (rng.random(n, dtype=np.float32) for _ in range(3))
        if kind == "add":
            return lambda: np.add(a, b, out=c)
        return lambda: np.copyto(c, a)

    base, run = interleaved(make(16), make(elements), reps)
    arrays = 3 if kind == "add" else 2
    return Bandwidth(label, arrays * 4 * elements, 1, arrays * 4 * elements, 1, base, run)


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
    best_ms: dict[str, float]  # fastest sample per kind
    median_ms: dict[str, float]
    rate_samples: list[float]  # fp32 / ConvInteger per interleaved round

    @property
    def rate(self) -> float:
        return self.best_ms["fp32"] / self.best_ms["ConvInteger"]

    @property
    def median_rate(self) -> float:
        return self.median_ms["fp32"] / self.median_ms["ConvInteger"]


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
        rows.append(ConvRow(shape, gflop, {k_: v["min_ms"] for k_, v in result.items()},
                            {k_: v["median_ms"] for k_, v in result.items()}, rate_samples))
    return rows


# ---------------------------------------------------------------------------------------------


def two_digits(value: float) -> float:
    """Two significant digits: the samples spread by more than the third."""
    return float(f"{value:.2g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    parser.add_argument("--reps", type=int, default=61,
                        help="interleaved samples per measurement (best, median and range "
                             "reported)")
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
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}; {args.reps} interleaved "
          f"samples per measurement, each about {SAMPLE_SECONDS * 1e3:.0f} ms of runs")
    print("best: from the fastest samples (STREAM's convention: on a shared host other "
          "processes only add time); median and range: over interleaved sample pairs\n")

    dispatch = {t: dispatch_seconds(t, args.reps) for t in (1, 2)}
    print("per-node dispatch, for context (Add chain slope on 16-element tensors): "
          + ", ".join(f"{t} thread(s) {s * 1e6:.2f} us" for t, s in dispatch.items()) + "\n")

    bw_l2 = ort_add_bandwidth("ORT Add chain, L2-resident", l2_elements, 1, args.reps, 65)
    bw_l3 = ort_add_bandwidth("ORT Add chain, L3-resident", l3_elements, 1, args.reps, 17)
    bw_dram = ort_add_bandwidth("ORT Add, DRAM", DRAM_ELEMENTS, 1, args.reps, 1)
    bw_dram2 = ort_add_bandwidth("ORT Add, DRAM", DRAM_ELEMENTS, 2, args.reps, 1)
    np_add_l2 = numpy_bandwidth("numpy.add(a, b, out=c), L2", l2 // 2 // 12, args.reps, "add")
    np_add = numpy_bandwidth("numpy.add(a, b, out=c), DRAM", DRAM_ELEMENTS, args.reps, "add")
    np_copy = numpy_bandwidth("numpy.copyto(c, a), DRAM", DRAM_ELEMENTS, args.reps, "copy")
    print("bandwidth in GB/s as the cost model counts it (bytes read + written once, per node):")
    print(f"{'kernel, working set':<34}{'set MiB':>10}{'threads':>8}{'nodes':>6}{'best':>9}"
          f"{'median':>9}"
          f"{'min':>9}{'max':>9}")
    for bw in (bw_l2, bw_l3, bw_dram, bw_dram2, np_add_l2, np_add, np_copy):
        print(bw.row())
    print(f"2 threads / 1 thread on DRAM: {bw_dram2.best / bw_dram.best:.2f}x best, "
          f"{bw_dram2.median / bw_dram.median:.2f}x median ({bw_dram2.best / 2:.1f} GB/s per "
          "core at 2 threads, best)\n")

    with tempfile.TemporaryDirectory(prefix="measure_cpu_constants_") as tmp:
        convs = measure_convs(args.reps, Path(tmp))
    print("convolutions, batch 1, 1 intra-op thread (engine's make_session), fastest of "
          "interleaved samples (median-based ratio beside it):")
    print(f"{'k':>2}{'cout':>6}{'cin':>6}{'hw':>5}{'GFLOP':>8}{'fp32 ms':>10}{'ConvInt ms':>12}"
          f"{'QLinear ms':>12}{'fp32/CI':>9}{'median':>8}{'min':>7}{'max':>7}{'fp32/QL':>9}")
    for c in convs:
        k, cout, cin, hw, _ = c.shape
        print(f"{k:>2}{cout:>6}{cin:>6}{hw:>5}{c.gflop:>8.3f}{c.best_ms['fp32']:>10.3f}"
              f"{c.best_ms['ConvInteger']:>12.3f}{c.best_ms['QLinearConv']:>12.3f}{c.rate:>9.3f}"
              f"{c.median_rate:>8.3f}{min(c.rate_samples):>7.3f}{max(c.rate_samples):>7.3f}"
              f"{c.best_ms['fp32'] / c.best_ms['QLinearConv']:>9.2f}")
    rates = [c.rate for c in convs]
    fp32_gflops = statistics.median(c.gflop / c.best_ms["fp32"] * 1e3 for c in convs)
    print(f"fp32 Conv median {fp32_gflops:.1f} GFLOP/s; QLinearConv / fp32 speed median "
          f"{statistics.median(c.best_ms['fp32'] / c.best_ms['QLinearConv'] for c in convs):.2f}x"
          "\n")

    ratio = bw_l2.best / bw_dram.best
    print("measured constants (the value as the code takes it, two significant digits):")
    print(f"_GBPS_PER_CORE = {two_digits(bw_dram.best):g} GB/s (best {bw_dram.best:.1f}, median "
          f"{bw_dram.median:.1f}, samples {min(bw_dram.samples):.1f} - "
          f"{max(bw_dram.samples):.1f}): ORT Add, 1 thread, "
          f"{bw_dram.working_set_bytes >> 20} MiB working set; at 2 threads "
          f"{bw_dram2.best / 2:.1f} per core")
    print(f"CACHE_BANDWIDTH_FACTOR[cpu] = {two_digits(ratio):g} (best {ratio:.2f}, median "
          f"{bw_l2.median / bw_dram.median:.2f}): ORT Add chain, 1 thread, L2-resident "
          f"{bw_l2.best:.1f} GB/s / DRAM {bw_dram.best:.1f} GB/s")
    print(f"REFERENCE_KERNEL_RATE[ConvInteger] = {two_digits(statistics.median(rates)):g} "
          f"(median over shapes {statistics.median(rates):.3f}, range {min(rates):.3f} - "
          f"{max(rates):.3f}; from medians {statistics.median(c.median_rate for c in convs):.3f})"
          f": fp32 Conv time / ConvInteger time, {len(convs)} shapes, 1 thread")
    print(f"\nelapsed {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
