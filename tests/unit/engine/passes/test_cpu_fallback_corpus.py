"""The committed CPU fallback against the corpus it was fitted on (here for the session's corpus
fixture): every stored fit's rows are re-estimated from the record's machine profile and
constants, and the fallback fitted over them is the one the code and cost_fit.json hold
(``scripts/fit_cpu_fallback.py --check``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from service.engine import cost_model

ROOT = Path(__file__).resolve().parents[4]


def test_the_committed_fallback_is_the_fit_of_the_committed_machine_fits(
        corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = importlib.import_module("fit_cpu_fallback")
    records = list(cost_model.load_cost_fits())
    costs = script.corpus_costs({r["model"] for f in records for r in f["rows"]}, corpus_dir)
    result = script.fit_fallback(records, costs)
    stored = cost_model.load_cpu_fallback()
    assert stored is not None
    assert script.problems(result, script.code_fallback(), stored["constants"]) == []
    assert result["error"]["leave_machine_out_median_abs_pct"] == \
        stored["error"]["leave_machine_out_median_abs_pct"]
