"""Fit the cost model's CPU fallback constants across every fitted machine, and their error on a
machine that was not in the fit.

A CPU target with no fit on its kernels (``service/engine/devices/cost_fit.json``, written by
``scripts/check_cost_model.py --write-fit`` on each kind of machine) is estimated with the
fallback constants ``COMPUTE_EFFICIENCY["cpu"]``, ``MEMORY_EFFICIENCY["cpu"]`` and
``NODE_OVERHEAD_S["cpu"]``. This script derives them from the stored fits' measurements:

- it rebuilds the corpus variants the fits measured (tests/corpus.py, the engine's passes; no
  latency is measured here) and analyses each one;
- each record's machine profile (what its fit divided measured time by) must reproduce the
  record's own ``fit_ms`` with the record's constants: a changed corpus or cost analysis fails
  the run instead of fitting on rows that no longer match;
- one least-squares fit (``cost_model.fit_cpu_constants``) over every machine's rows is the
  fallback; leave one machine out (fit on the others, estimate that machine's rows) is its
  error on a CPU it has not seen, which is what a target without a fit is.

The cache bandwidth factor keeps its measured value and the reference-kernel rate its default
(no corpus sample runs a reference kernel), as in ``check_cost_model.py``.

    .venv/bin/python scripts/fit_cpu_fallback.py --write --out docs/bench/cost_fallback.txt
    .venv/bin/python scripts/fit_cpu_fallback.py --check   # exit 1 if a stored value drifts
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_output import machine_header, tee_to  # noqa: E402

FIT_FILE = ROOT / "service" / "engine" / "devices" / "cost_fit.json"
REPRODUCE_TOLERANCE = 0.01  # a record's fit_ms, re-estimated from its profile and constants
DRIFT_TOLERANCE = 0.02  # stored fallback vs the fit this run makes (grid steps are 1.6 %)
FITTED = ("compute_efficiency", "memory_efficiency", "node_overhead_s")


def machine_of(record: dict):  # type: ignore[no-untyped-def]
    """The profile a stored fit divided measured time by: a host profile with the record's
    kernel features (which kernels and formats run fast), its threads as cores, and the peaks
    and bandwidth the record stored."""
    from service.engine.devices.host import profile_from_cpuinfo

    machine = record["machine"]
    stored = machine.get("profile")
    if not stored:
        raise ValueError(f"the fit for {machine.get('cpu')} stores no machine profile")
    arch = {"x86_64": "x86_64", "arm64": "aarch64"}.get(machine["architecture"], "other")
    base = profile_from_cpuinfo("flags : " + " ".join(machine.get("kernel_features") or ()),
                                "", arch, int(machine.get("threads") or 1))
    return base.model_copy(update={
        "title": str(machine.get("cpu")), "peak_gops": dict(stored["peak_gops"]),
        "memory_bandwidth_gbps": float(stored["memory_bandwidth_gbps"])})


_HEADLINE = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
             ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("i8mm", "i8mm"),
             ("dotprod", "dot product"), ("neon", "NEON"))


def machine_label(machine: dict) -> str:
    """A short name for a fitted machine: its CPU and the widest kernels it runs ("Intel(R)
    Xeon(R) Processor (AMX)"), which tells two machines of one model name apart."""
    name = re.sub(r"\s*\(\d+ usable cores?\)$", "",
                  str(machine.get("cpu", "?")).removeprefix("This machine: "))
    features = set(machine.get("kernel_features") or ())
    top = next((label for feature, label in _HEADLINE if feature in features), "baseline")
    if "avx512_bf16" in features and top != "AMX":
        top += " + BF16"
    return f"{name} ({top})"


def corpus_costs(models: set[str], cache_dir: Path) -> dict[tuple[str, str], object]:
    """(model, variant) -> ModelCost of every corpus variant, built as check_cost_model.py
    builds them, batch 1."""
    import onnx
    from check_cost_model import build_variants

    from service.engine import cost_model
    from tests import corpus

    costs: dict[tuple[str, str], object] = {}
    with tempfile.TemporaryDirectory(prefix="fit_cpu_fallback_") as tmp:
        for name in sorted(models):
            model = corpus.BUILDERS[name](cache_dir)
            shapes = {k: list(v[:1].shape) for k, v in model.inputs.items()}
            for variant, path in build_variants(model, Path(tmp) / name).items():
                costs[(name, variant)] = cost_model.analyse(onnx.load(str(path)), shapes)
    return costs


def estimate_ms(cost, machine, constants) -> float:  # type: ignore[no-untyped-def]
    from service.engine import cost_model

    return cost_model.latency_s(cost, machine, constants) * 1e3


def code_fallback() -> dict[str, float]:
    """The fallback constants the code uses (``Constants.defaults("cpu")``)."""
    from service.engine import cost_model

    defaults = cost_model.Constants.defaults("cpu")
    return {name: getattr(defaults, name) for name in FITTED}


def _abs_stats(errors: list[float]) -> tuple[float, float]:
    absolute = [abs(e) for e in errors]
    return round(statistics.median(absolute), 1), round(max(absolute), 1)


def fit_fallback(records: list[dict], costs: dict) -> dict:
    """The pooled fit, its in-sample error, and each machine's leave-one-machine-out error and
    the current fallback's error there, with the reproduction check per record."""
    from service.engine import cost_model

    machines = [machine_of(r) for r in records]
    samples = []  # (record index, cost, measured ms, label)
    reproduce = []
    for i, (record, machine) in enumerate(zip(records, machines, strict=True)):
        own = cost_model.Constants.from_record(record["constants"])
        worst = 0.0
        for row in record["rows"]:
            cost = costs.get((row["model"], row["variant"]))
            if cost is None:
                raise ValueError(f"{record['machine']['cpu']}: no corpus variant "
                                 f"{row['model']}:{row['variant']} to re-estimate")
            worst = max(worst, abs(estimate_ms(cost, machine, own) / row["fit_ms"] - 1))
            samples.append((i, cost, float(row["measured_ms"]), f"{row['model']}:{row['variant']}"))
        reproduce.append(worst)

    def fit(indices: set[int]):  # type: ignore[no-untyped-def]
        chosen = [s for s in samples if s[0] in indices]
        constants, _ = cost_model.fit_cpu_constants(
            [(c, ms, label) for _, c, ms, label in chosen], machines[0],
            profiles=[machines[i] for i, *_ in chosen])
        return constants

    def errors(constants, index: int) -> list[float]:  # type: ignore[no-untyped-def]
        return [100.0 * (estimate_ms(c, machines[i], constants) - ms) / ms
                for i, c, ms, _ in samples if i == index]

    everyone = set(range(len(records)))
    pooled = fit(everyone)
    current = cost_model.Constants.defaults("cpu")
    per_machine = []
    loo_all: list[float] = []
    for i, record in enumerate(records):
        others = fit(everyone - {i}) if len(records) >= 2 else None
        loo = errors(others, i) if others is not None else []
        loo_all += loo
        own_error = record.get("error") or {}
        per_machine.append({
            "cpu": record["machine"]["cpu"], "label": machine_label(record["machine"]),
            "kernel_features": record["machine"].get("kernel_features"),
            "fit_date": record.get("date"), "samples": len(record["rows"]),
            "reproduced_within_pct": round(100 * reproduce[i], 3),
            "own_fit_median_abs_pct": own_error.get("median_abs_pct"),
            "own_fit_loo_model_median_abs_pct": own_error.get("loo_median_abs_pct"),
            "pooled": _abs_stats(errors(pooled, i)),
            "leave_machine_out": _abs_stats(loo) if loo else None,
            "leave_machine_out_constants": None if others is None else {
                k: getattr(others, k) for k in FITTED},
            "current_fallback": _abs_stats(errors(current, i)),
        })
    pooled_errors = [e for i in everyone for e in errors(pooled, i)]
    return {
        "constants": {k: getattr(pooled, k) for k in FITTED},
        "reproduce": reproduce,
        "error": {
            "machines": len(records), "samples": len(samples),
            "architectures": sorted({r["machine"]["architecture"] for r in records}),
            "median_abs_pct": _abs_stats(pooled_errors)[0],
            "max_abs_pct": _abs_stats(pooled_errors)[1],
            **({"leave_machine_out_median_abs_pct": _abs_stats(loo_all)[0],
                "leave_machine_out_max_abs_pct": _abs_stats(loo_all)[1]} if loo_all else {}),
            "per_machine": per_machine,
        },
    }


def problems(result: dict, code: dict, stored: dict | None) -> list[str]:
    """Why the stored fallback does not stand ([] when it does): a record whose profile and
    constants no longer reproduce its own fit (the corpus or the cost analysis changed since),
    or a fallback constant in the code (``code``) or in cost_fit.json (``stored``; None: not
    compared) that is not the one this fit gives."""
    out = [f"{m['cpu']}: its profile and constants reproduce its fit_ms only within "
           f"{m['reproduced_within_pct']} % (corpus or cost analysis changed since the fit: "
           "rerun check_cost_model.py --write-fit on that machine)"
           for m in result["error"]["per_machine"]
           if m["reproduced_within_pct"] > 100 * REPRODUCE_TOLERANCE]
    places = [("service/engine/cost_model.py", code)]
    if stored is not None:
        places.append(("cost_fit.json fallback", stored))
    for name, value in result["constants"].items():
        for where, table in places:
            have = table.get(name)
            if not have or abs(float(have) / value - 1) > DRIFT_TOLERANCE:
                out.append(f"DRIFT {name}: {where} has {have}, the fit gives {value:g}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="store the fallback and its error in cost_fit.json ('fallback')")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if cost_model's fallback or the stored record drifts")
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "edgepress_corpus")
    args = parser.parse_args(argv)
    header = machine_header("scripts/fit_cpu_fallback.py", argv if argv is not None
                            else sys.argv[1:], "no latency measured here: the stored fits' rows")
    with tee_to(args.out, header):
        return _run(args)


def _run(args) -> int:  # type: ignore[no-untyped-def]
    from service.engine import cost_model

    data = json.loads(FIT_FILE.read_text(encoding="utf-8"))
    records = list(cost_model.fit_records(data))
    if not records:
        print("no stored fits in cost_fit.json: nothing to fit the fallback on")
        return 1
    costs = corpus_costs({r["model"] for rec in records for r in rec["rows"]}, args.cache_dir)
    result = fit_fallback(records, costs)
    error = result["error"]
    print(f"{len(records)} stored fits, {error['samples']} measurements; the machines' own "
          "fits, then the fallback fitted on all of them (pooled), on the others only "
          "(leave this machine out) and the fallback in the code; median / max |error| %\n")
    print(f"{'machine':<42}{'kernels':<60}{'n':>3}{'repro%':>8}{'own':>7}{'loo-mdl':>8}"
          f"{'pooled':>14}{'leave-out':>14}{'in code':>14}")
    for m in error["per_machine"]:
        def pair(v):  # type: ignore[no-untyped-def]
            return f"{v[0]:6.1f} /{v[1]:5.0f}" if v else f"{'-':>13}"
        print(f"{m['label'][:41]:<42}{' '.join(m['kernel_features'] or ())[:59]:<60}"
              f"{m['samples']:>3}{m['reproduced_within_pct']:8.2f}"
              f"{m['own_fit_median_abs_pct']!s:>7}{m['own_fit_loo_model_median_abs_pct']!s:>8}"
              f" {pair(m['pooled'])} {pair(m['leave_machine_out'])} {pair(m['current_fallback'])}")
    for m in error["per_machine"]:
        if m["leave_machine_out_constants"]:
            print(f"  without {m['label']} (fit of {m['fit_date']}): " + ", ".join(
                f"{k} {v:g}" for k, v in m["leave_machine_out_constants"].items()))
    print(f"\npooled over {error['machines']} machines ({', '.join(error['architectures'])}): "
          f"median |error| {error['median_abs_pct']} % (max {error['max_abs_pct']} %)")
    if "leave_machine_out_median_abs_pct" in error:
        print(f"leave one machine out: median |error| {error['leave_machine_out_median_abs_pct']}"
              f" % (max {error['leave_machine_out_max_abs_pct']} %), the error on a CPU "
              "without a fit")
    fallback = result["constants"]
    for name, value in fallback.items():  # the lines cost_sources.json quotes
        print(f"{name.upper()}[cpu] = {value:g} (the fallback, fitted over {error['machines']} "
              "machines' corpus latencies)")

    stored = None if args.write else (data.get("fallback") or {}).get("constants") or {}
    failures = problems(result, code_fallback(), stored)
    if args.write:
        data["fallback"] = {
            "command": " ".join(["scripts/fit_cpu_fallback.py", *sys.argv[1:]]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "constants": fallback,
            "error": {k: v for k, v in error.items() if k != "per_machine"} | {
                "per_machine": [{k: m[k] for k in ("cpu", "label", "kernel_features", "samples",
                                                   "pooled", "leave_machine_out")}
                                for m in error["per_machine"]]},
        }
        FIT_FILE.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {FIT_FILE.relative_to(ROOT)} (fallback)")
    for line in failures:
        print(line)
    return 1 if failures and (args.check or args.write) else 0


if __name__ == "__main__":
    sys.exit(main())
