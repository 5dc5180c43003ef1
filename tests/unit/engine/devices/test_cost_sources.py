"""Every constant of the cost model carries a label, and every SOURCED one its sources.

``service/engine/devices/cost_sources.json`` has one row per constant and key (a device kind,
a device profile, an op, or ``*`` for a whole table). The numeric module-level constants of
``cost_model`` and ``devices.host`` are found by reading the code, so a new constant without a
row, a row whose value drifted from the code, a SOURCED row without a URL and a quote, a MEASURED row
whose quote (naming the constant and the code's value) is not in the committed output of its
script, or a profile's ``cost_constants`` entry without its row all fail here.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine import cost_model
from service.engine.devices import host, list_devices

ROOT = Path(__file__).resolve().parents[4]
SOURCES = ROOT / "service" / "engine" / "devices" / "cost_sources.json"
MODULES = (cost_model, host)
LABELS = {"FITTED", "SOURCED", "MEASURED", "ASSUMPTION", "EXACT", "CONVENTION"}


def _numeric(node: ast.AST) -> bool:
    """A number literal, or a dict / tuple / list holding one (strings and names are not)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _numeric(node.operand)
    if isinstance(node, ast.Dict):
        return any(_numeric(v) for v in node.values if v is not None)
    if isinstance(node, (ast.Tuple, ast.List)):
        return any(_numeric(e) for e in node.elts)
    return False


def numeric_constants(module: Any) -> dict[str, int]:
    """Module-level names bound to a numeric literal (or a table of them): name -> line."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    found: dict[str, int] = {}
    for stmt in tree.body:
        targets: list[ast.expr] = []
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if _numeric(value):
            found.update({t.id: stmt.lineno for t in targets if isinstance(t, ast.Name)})
    return found


def _comment_above(module: Any, line: int) -> str:
    """The comment block above a constant, across neighbouring constant assignments."""
    lines = Path(module.__file__).read_text(encoding="utf-8").splitlines()
    text, index = [], line - 2
    while index >= 0 and (lines[index].startswith("#")
                          or re.match(r"^_?[A-Z][A-Z0-9_]* = ", lines[index])):
        if lines[index].startswith("#"):
            text.append(lines[index])
        index -= 1
    return "\n".join(text)


@pytest.fixture(scope="module")
def sources() -> dict[str, Any]:
    return json.loads(SOURCES.read_text(encoding="utf-8"))


def _rows(sources: dict[str, Any], constant: str) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in sources["constants"] if r["constant"] == constant}


def test_the_code_finds_the_constants_it_should() -> None:
    # the scan itself: it sees the efficiency tables and the host guesses, not string tables
    found = {name for m in MODULES for name in numeric_constants(m)}
    assert {"COMPUTE_EFFICIENCY", "MEMORY_EFFICIENCY", "CACHE_BANDWIDTH_FACTOR",
            "NODE_OVERHEAD_S", "REFERENCE_KERNEL_RATE", "_GBPS_PER_CORE",
            "_WATTS_PER_CORE"} <= found
    assert "_QDQ_FORMATS" not in found and "COST_FIT_FILE" not in found


def test_every_numeric_constant_has_a_labelled_row_with_the_codes_value(sources) -> None:  # type: ignore[no-untyped-def]
    profiles = {p.name for p in list_devices()}
    for module in MODULES:
        for name, line in numeric_constants(module).items():
            rows = _rows(sources, name)
            assert rows, f"{module.__name__}.{name} has no row in {SOURCES.name}"
            for key, row in rows.items():
                assert row["label"] in LABELS, f"{name}[{key}]: label {row['label']!r}"
                assert row["derivation"].strip(), f"{name}[{key}]: no derivation"
            # the comment above the constant names every label its rows carry
            comment = _comment_above(module, line)
            for label in {r["label"] for r in rows.values() if r["key"] not in profiles}:
                assert label in comment, f"{module.__name__}.{name}: comment lacks {label}"
            value = getattr(module, name)
            if "*" in rows:
                assert len(rows) == 1, f"{name}: a '*' row stands alone"
                if rows["*"]["value"] is not None:
                    assert rows["*"]["value"] == value, f"{name}: code {value}"
                continue
            if isinstance(value, dict):
                own = {k: r for k, r in rows.items() if k not in profiles}
                assert set(own) == set(value), f"{name}: rows {sorted(own)} vs keys {sorted(value)}"
                for key, row in own.items():
                    assert row["value"] == value[key], f"{name}[{key}]: code {value[key]}"
            else:
                assert len(rows) == 1, f"{name}: one row for a scalar"
                (row,) = rows.values()
                assert row["value"] == value, f"{name}: code {value}, row {row['value']}"


def test_every_row_names_a_constant_of_the_code(sources) -> None:  # type: ignore[no-untyped-def]
    names = {name for m in MODULES for name in numeric_constants(m)}
    stale = {r["constant"] for r in sources["constants"]} - names
    assert not stale, f"rows for constants the code no longer has: {sorted(stale)}"


def test_every_sourced_row_cites_a_url_and_the_figure(sources) -> None:  # type: ignore[no-untyped-def]
    for row in sources["constants"]:
        if row["label"] != "SOURCED":
            continue
        assert row.get("sources"), f"{row['constant']}[{row['key']}]: SOURCED without sources"
        for source in row["sources"]:
            url = source["url"]
            assert url.startswith(("https://", "http://")) or (ROOT / url).is_file(), url
            assert source["quote"].strip(), f"{row['constant']}[{row['key']}]: empty quote"


def measured_row_problems(row: dict[str, Any], root: Path = ROOT) -> list[str]:
    """Why a MEASURED row is not backed by its committed output ([] when it is): its script
    must exist, and every source must be an output under docs/bench/ that this script wrote
    (its header's command) and that holds the quote verbatim; the quote must start with
    ``NAME = VALUE`` (``NAME[key]`` for a table), VALUE the row's value."""
    where = f"{row['constant']}[{row['key']}]"
    problems = []
    script = row.get("script", "")
    if not script or not (root / script).is_file():
        problems.append(f"{where}: script {script!r} is not a committed file")
    if not row.get("sources"):
        problems.append(f"{where}: MEASURED without its output as a source")
    name = row["constant"] if row["key"] == "*" else where
    for source in row.get("sources", []):
        url, quote = source["url"], source["quote"]
        path = root / url
        if not url.startswith("docs/bench/") or not path.is_file():
            problems.append(f"{where}: {url} is not a committed output under docs/bench/")
            continue
        text = path.read_text(encoding="utf-8")
        if not text.startswith(f"# command: {script}"):
            problems.append(f"{where}: {url} was not written by {script}")
        if not quote.strip() or quote not in text:
            problems.append(f"{where}: quote not in {url}: {quote!r}")
        value = f"{row['value']:g}"
        if not re.match(rf"{re.escape(name)} = {re.escape(value)}(?![0-9.])", quote):
            problems.append(f"{where}: quote does not state {name} = {value}")
    return problems


def test_every_measured_row_quotes_its_scripts_committed_output(sources) -> None:  # type: ignore[no-untyped-def]
    # and so does a FITTED row whose fit a committed script makes (the CPU fallback)
    measured = [r for r in sources["constants"] if r["label"] == "MEASURED"
                or (r["label"] == "FITTED" and r.get("script"))]
    assert measured
    assert any(r["label"] == "FITTED" for r in measured)
    for row in measured:
        assert not measured_row_problems(row), measured_row_problems(row)


def test_a_measured_row_whose_figure_is_not_in_its_output_fails(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the check itself: a copy of a real row against an output that lost, or changed, the line
    row = next(r for r in sources["constants"] if r["label"] == "MEASURED")
    (tmp_path / row["script"]).parent.mkdir(parents=True)
    (tmp_path / row["script"]).write_text("")
    output = tmp_path / row["sources"][0]["url"]
    output.parent.mkdir(parents=True)
    text = (ROOT / row["sources"][0]["url"]).read_text(encoding="utf-8")
    output.write_text(text, encoding="utf-8")
    assert measured_row_problems(row, tmp_path) == []
    output.write_text(text.replace(row["sources"][0]["quote"], ""), encoding="utf-8")
    assert any("quote not in" in p for p in measured_row_problems(row, tmp_path))
    output.write_text(text, encoding="utf-8")
    assert any("does not state" in p
               for p in measured_row_problems({**row, "value": row["value"] * 2}, tmp_path))
    output.write_text(text.replace("# command: ", "# command: scripts/other.py ", 1))
    assert any("not written by" in p for p in measured_row_problems(row, tmp_path))


def test_assumptions_say_what_was_looked_for_or_why_none_applies(sources) -> None:  # type: ignore[no-untyped-def]
    for row in sources["constants"]:
        if row["label"] == "ASSUMPTION":
            assert row.get("searched") or len(row["derivation"]) > 40, row["constant"]


def test_profile_cost_constants_and_their_rows_agree(sources) -> None:  # type: ignore[no-untyped-def]
    by_key = {(r["key"], r["constant"].lower()): r for r in sources["constants"]}
    seen = set()
    for profile in list_devices():
        for constant, value in profile.cost_constants.items():
            row = by_key.get((profile.name, constant))
            assert row is not None, f"{profile.name}.cost_constants.{constant} has no row"
            assert row["label"] == "SOURCED" and row["value"] == value, (profile.name, constant)
            # the profile's own sources entry points at the derivation
            assert SOURCES.name in profile.sources[f"cost_constants.{constant}"]
            # and the figures it was fitted to are listed as measurements of this device
            urls = {m["url"] for m in sources["measurements"] if m["device"] == profile.name}
            assert urls and urls <= {s["url"] for s in row["sources"]}
            seen.add((profile.name, constant))
    profiles = {p.name for p in list_devices()}
    per_profile = {k for k in by_key if k[0] in profiles}
    assert per_profile == seen, f"rows for values no profile carries: {per_profile - seen}"


def test_measurements_are_quoted_and_fit_error_is_recorded(sources) -> None:  # type: ignore[no-untyped-def]
    profiles = {p.name for p in list_devices()}
    for m in sources["measurements"]:
        assert m["device"] in profiles and m["latency_ms"] > 0 and m["batch"] == 1
        assert m["url"].startswith("https://") and m["quote"].strip()
        # the quoted figure is the one stored
        assert f"{m['latency_ms']:g}" in m["quote"] or str(m["latency_ms"]) in m["quote"], m
    fitted = {p.name for p in list_devices() if p.cost_constants}
    assert fitted <= set(sources["fits"])
    assert set(sources["not_fitted"]).isdisjoint(fitted)


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("source_cost_constants")


def test_the_fit_recovers_known_gpu_constants(script) -> None:  # type: ignore[no-untyped-def]
    # latencies made by known constants on a GPU profile (not published numbers): the fit of
    # compute efficiency and per-kernel overhead must find them again
    from service.engine.devices import get_device

    t4 = get_device("nvidia_t4").model_copy(update={"cost_constants": {}})
    costs = [cost_model.analyse(script.NETWORKS[name](fmt))
             for name, fmt in [("mobilenet_v1", "fp16"), ("mobilenet_v2", "fp32"),
                               ("mobilenet_v1", "int8"), ("mobilenet_v2", "fp16")]]
    truth = {"compute_efficiency": 0.2, "node_overhead_s": 9e-6}
    measured = np.array([script._seconds(c, t4, truth) for c in costs])
    values, pred = script.fit_device(costs, measured, t4,
                                     ["compute_efficiency", "node_overhead_s"])
    assert values["compute_efficiency"] == pytest.approx(0.2, rel=0.03)
    assert values["node_overhead_s"] == pytest.approx(9e-6, rel=0.05)
    assert np.allclose(pred, measured, rtol=0.02)


def test_the_reference_networks_have_their_published_size(script) -> None:  # type: ignore[no-untyped-def]
    # FLOPs (2 per multiply-add) at 224x224 within a few % of the papers' multiply-adds:
    # ResNet-50 4.1 G, MobileNet v1 569 M, MobileNet v2 300 M (at width 0.5: timm's 0.1 G),
    # ResNet-18 1.8 G, VGG-13 11.3 G; int8 QDQ is detected as int8
    for name, gmacs in [("resnet50", 4.1), ("mobilenet_v1", 0.569), ("mobilenet_v2", 0.300),
                        ("mobilenet_v2_050", 0.1), ("resnet18", 1.82), ("vgg13", 11.31)]:
        cost = cost_model.analyse(script.NETWORKS[name]("fp32"))
        assert cost.flops / 2e9 == pytest.approx(gmacs, rel=0.06), name
    cost = cost_model.analyse(script.NETWORKS["mobilenet_v1"]("int8"))
    convs = [n for n in cost.nodes if n.op_type == "Conv"]
    assert convs and all(n.precision == "int8" and n.qdq_format == "int8_static_qdq_s8s8"
                         for n in convs)


def test_gpu_bandwidth_defaults_are_the_medians_of_their_quoted_microbenchmarks(script, sources) -> None:  # type: ignore[no-untyped-def]
    # every figure the derivation uses appears verbatim in its quote, and the GPU kind's memory
    # efficiency and cache factor in cost_model.py are what the script derives from them
    for g in sources["bandwidth"]["gpus"]:
        if g.get("triad_gbps"):
            assert f"{g['triad_gbps']:g}" in g["triad_source"]["quote"], g["gpu"]
        if g.get("peak_gbps"):
            assert f"{g['peak_gbps']:,}" in g["peak_source"]["quote"] or \
                f"{g['peak_gbps']:g}" in g["peak_source"]["quote"] or \
                f"{g['peak_gbps'] / 1000:g} TB/s" in g["peak_source"]["quote"], g["gpu"]
        if g.get("l2_gbps"):
            for figure in (g["l2_gbps"], g["dram_gbps"]):
                assert f"{figure:g} GB/s" in g["l2_source"]["quote"], g["gpu"]
    derived = script.bandwidth_defaults()
    assert derived["memory_efficiency"] == cost_model.MEMORY_EFFICIENCY["gpu"]
    assert derived["cache_bandwidth_factor"] == cost_model.CACHE_BANDWIDTH_FACTOR["gpu"]
    assert script.check_kind("gpu", derived) == []
    assert script.check_kind("gpu", {**derived, "memory_efficiency": 0.7})


def test_npu_kind_defaults_are_derived_from_the_npu_fits(script) -> None:  # type: ignore[no-untyped-def]
    # the NPU kind's compute efficiency is the median of the NPU profiles' fits and its
    # per-node overhead the geometric mean of those that fit it; a drifted default is reported
    results = {"a": {"kind": "npu", "fitted": {"compute_efficiency": 0.1}},
               "b": {"kind": "npu", "fitted": {"compute_efficiency": 0.3, "node_overhead_s": 1e-7}},
               "c": {"kind": "npu", "fitted": {"compute_efficiency": 0.5, "node_overhead_s": 1e-5}},
               "d": {"kind": "gpu", "fitted": {"compute_efficiency": 0.9, "node_overhead_s": 1.0}}}
    derived = script.npu_defaults(results)
    assert derived == {"compute_efficiency": 0.3, "node_overhead_s": pytest.approx(1e-6)}
    assert script.check_kind("npu", {"compute_efficiency": cost_model.COMPUTE_EFFICIENCY["npu"],
                                     "node_overhead_s": cost_model.NODE_OVERHEAD_S["npu"]}) == []
    assert script.check_kind("npu", {"node_overhead_s": 8e-6})


def test_the_npu_sensitivity_table_backs_what_the_memory_efficiency_row_says(script) -> None:  # type: ignore[no-untyped-def]
    # the NPU memory-efficiency row says the Intel NPU's CNN latencies agree with the decode-
    # derived 0.72 (as good as anything from 0.6 up) and rule out low values
    table = script.sensitivity("intel_core_ultra_npu")
    assert set(table) == {(m, c) for m in script.SENSITIVITY_MEMORY
                          for c in script.SENSITIVITY_CACHE}
    assert cost_model.MEMORY_EFFICIENCY["npu"] in script.SENSITIVITY_MEMORY
    flat = [table[(m, 2.0)] for m in (0.6, 0.72, 0.9, 1.0)]
    assert table[(0.2, 2.0)] > 2 * max(flat) and table[(0.45, 2.0)] > max(flat)


def test_decode_bytes_count_every_matrix_and_the_cache(script) -> None:  # type: ignore[no-untyped-def]
    # a toy decoder counted by hand: 2 layers, hidden 8, 4 query heads and 2 KV heads of 2,
    # MLP 16, vocabulary 10, context 5
    model = {"layers": 2, "hidden": 8, "intermediate": 16, "heads": 4, "kv_heads": 2,
             "head_dim": 2, "vocab": 10, "tied": True}
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    bits = {"weight_bits": 4, "output_bits": 8, "kv_bits": 16}
    expected = (2 * per_layer * 4 + 10 * 8 * 8 + 2 * 2 * 4 * 5 * 16) / 8
    assert script.decode_bytes(model, bits, 5) == expected
    # Llama 3.2 1B at 16 bits with no cache: 2 bytes for each of its 1.24 B parameters (its
    # output projection is its embedding, counted once; the norms are left out)
    llama = json.loads(SOURCES.read_text(encoding="utf-8"))["llm_decode"]["models"]
    weights = script.decode_bytes(llama["llama_3_2_1b"],
                                  {"weight_bits": 16, "output_bits": 16, "kv_bits": 0}, 0) / 2
    assert weights == pytest.approx(1.236e9, rel=0.01)


def test_decode_bandwidth_recovers_a_known_line(script) -> None:  # type: ignore[no-untyped-def]
    sizes = [0.7e9, 1.8e9, 4.0e9]
    seconds = [0.004 + b / 60e9 for b in sizes]
    bandwidth, fixed = script.decode_bandwidth(sizes, seconds)
    assert bandwidth == pytest.approx(60e9, rel=1e-6) and fixed == pytest.approx(0.004)


def test_npu_memory_efficiency_is_the_median_of_its_quoted_decode_rates(script, sources) -> None:  # type: ignore[no-untyped-def]
    # every rate and peak the derivation uses appears in its quote (or, for a peak, in its
    # note), and cost_model.py holds what the script derives; a drifted default is reported
    data = sources["llm_decode"]
    for device in data["devices"]:
        peak = f"{device['peak_gbps']:g}"
        assert peak in device["peak_source"]["quote"] or peak in device.get("peak_note", ""), \
            device["device"]
        assert device["peak_source"]["url"].startswith("https://")
        assert len({r["model"] for r in device["rates"]}) >= 2, device["device"]
        for rate in device["rates"]:
            assert rate["model"] in data["models"]
            assert f"tokens_per_second: {rate['tokens_per_second']}" in rate["source"]["quote"]
            assert rate["source"]["url"].startswith("https://github.com/quic/ai-hub-models/")
    for model in data["models"].values():
        for key, field in (("hidden_size", "hidden"), ("intermediate_size", "intermediate"),
                           ("num_hidden_layers", "layers")):
            assert f'"{key}": {model[field]}' in model["source"]["quote"]
    derived = script.npu_memory_efficiency()
    assert derived["memory_efficiency"] == cost_model.MEMORY_EFFICIENCY["npu"]
    assert script.check_kind("npu", derived) == []
    assert script.check_kind("npu", {"memory_efficiency": 0.6})


def test_npu_cache_factor_is_the_joint_fit_to_the_npu_latencies(script) -> None:  # type: ignore[no-untyped-def]
    # the stored default is where the summed error over every NPU latency is least, and it is
    # a real minimum: both ends of the grid fit worse
    derived = script.npu_cache_factor(cost_model.MEMORY_EFFICIENCY["npu"])
    assert derived["cache_bandwidth_factor"] == cost_model.CACHE_BANDWIDTH_FACTOR["npu"]
    assert script.check_kind("npu", derived) == []
    assert 1.0 < derived["cache_bandwidth_factor"] < 32.0
