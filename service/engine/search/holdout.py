"""Held-out evaluation: every third dataset sample is kept out of calibration and retraining,
and the constraints are judged on those samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from service.engine.limits import EngineLimits
from service.engine.search.candidate import Candidate


def split_holdout(
    model: onnx.ModelProto, dataset: dict, labels: Any, directory: Path,
) -> tuple[dict, Any, dict | None, Any, Path | None, Path | None, dict]:
    """Keep every third sample out of calibration and training (``split_for_evaluation``).

    Returns (train arrays, train labels, holdout arrays, holdout labels, train .npz path,
    holdout .npz path, split record); the holdout (and both paths) are None for a dataset of a
    single sample. Candidates calibrate/train on the train file and evaluate on the holdout.
    """
    import numpy as np

    from service.engine.dataset import split_for_evaluation

    train, train_labels, hold, hold_labels, record = split_for_evaluation(model, dataset, labels)
    if hold is None:
        return dataset, labels, None, None, None, None, record
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arrays_in, lab in (("train_split", train, train_labels),
                                 ("holdout_split", hold, hold_labels)):
        arrays = dict(arrays_in)
        if lab is not None:
            arrays["labels"] = lab
        path = directory / f"{name}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        paths.append(path)
    return train, train_labels, hold, hold_labels, paths[0], paths[1], record


@dataclass
class HoldoutReference:
    """The held-out feeds and the original's outputs on them: computed once per search, every
    candidate is compared with the same reference."""

    feeds: list[dict[str, Any]]
    label_chunks: Any
    outputs: dict[str, list[Any]]


def holdout_reference(
    original_path: Path, model: onnx.ModelProto, holdout: dict, labels: Any,
    limits: EngineLimits,
) -> HoldoutReference:
    from service.engine.evaluate import dataset_feeds, make_session, run_all

    feeds, label_chunks = dataset_feeds(model, holdout, labels, limits.eval_samples)
    return HoldoutReference(feeds, label_chunks,
                            run_all(make_session(original_path, limits.latency_threads), feeds))


def holdout_metrics(cand: Candidate, reference: HoldoutReference, limits: EngineLimits) -> None:
    """Fidelity and accuracy of ``cand`` on the held-out samples (what the constraints use)."""
    from service.engine.evaluate import (
        accuracy,
        compare_output,
        is_classifier_like,
        make_session,
        run_all,
    )

    feeds, label_chunks, ref = reference.feeds, reference.label_chunks, reference.outputs
    assert cand.result is not None
    out = run_all(make_session(cand.result.model_path, limits.latency_threads), feeds)
    fidelity = {k: compare_output(ref[k], out[k]) for k in ref if k in out}
    cosines = [f["cosine"] for f in fidelity.values()]
    tops = [f["top1_agreement"] for f in fidelity.values() if f["top1_agreement"] is not None]
    m = cand.metrics
    m["pipeline_min_cosine"], m["pipeline_accuracy_after"] = m["min_cosine"], m["accuracy_after"]
    m["min_cosine"] = None if not cosines or None in cosines else min(cosines)
    m["top1_agreement"] = min(tops) if tops else None
    m["holdout_fidelity"] = {k: {x: f.get(x) for x in ("cosine", "sqnr_db", "max_abs_error",
                                                     "top1_agreement")}
                             for k, f in fidelity.items()}
    m["holdout_samples"] = sum(next(iter(f.values())).shape[0] for f in feeds)
    cls_out = next((k for k in ref if is_classifier_like(ref[k])), None)
    if label_chunks is not None and cls_out is not None and cls_out in out:
        before, after = accuracy(ref[cls_out], label_chunks), accuracy(out[cls_out], label_chunks)
        m["accuracy_before"], m["accuracy_after"] = before, after
        m["accuracy_drop"] = before - after


def evaluation_note(dataset: dict | None, holdout: dict | None,
                     record: dict | None = None) -> dict:
    if holdout is None:
        return {"split": None, "record": record,
                "note": "constraints judged on the evaluation inputs of each candidate's "
                "pipeline" + (" (a single sample: evaluated in-sample)"
                              if dataset is not None else " (generated inputs)")}
    n_train = next(iter(dataset.values())).shape[0] if dataset else 0
    n_hold = next(iter(holdout.values())).shape[0]
    return {"split": "every third sample held out", "train_samples": int(n_train),
            "holdout_samples": int(n_hold),
            "note": "calibration and retraining saw only the train split; accuracy and "
                    "fidelity constraints are judged on the held-out samples"}


