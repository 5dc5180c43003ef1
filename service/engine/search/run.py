"""Auto mode: search compression candidates for a target device under constraints.

``run_auto`` is what ``compress(model, "auto")`` runs. It

1. ingests the model once, describes what it is made of (CNN, transformer, recurrent, MLP: the
   share of weights held by Conv, MatMul/Gemm and LSTM/GRU layers) and resolves the device
   profile (``service.engine.devices``);
2. plans candidates from what the device runs fast (``DeviceProfile.quant_formats``, in the
   profile's order of preference) and what the model is made of: static int8 QDQ in the
   device's flavour (u8s8, s8s8 symmetric for TensorRT, u8u8 / u16u8 for QNN, reduce-range for
   x86 without VNNI), dynamic int8 for MatMul/recurrent layers on CPUs, int4 weight-only for
   MatMul-heavy models (for decoder LLMs: GPTQ/AWQ/HQQ at block 128, mixed int4/int8 by
   measured layer sensitivity, the embedding table int8), fp16 where it is native, mixes
   (static convolutions + dynamic recurrent layers, int4 MatMul + int8 rest), and channel
   pruning levels combined with int8 when a dataset allows recovery;
3. runs each candidate as a recipe job (``service.engine.recipe``) (measured on this host: size, latency against
   the original, fidelity, accuracy) and estimates it on the target with the cost model
   (latency, peak memory, energy); candidates run in parallel processes when the host has the
   cores (one latency-measuring process per 4 cores), in order of promise;
4. stops early when a candidate meets every constraint and no remaining one can beat it on the
   objective (optimistic bounds from the formats: size factor, peak-throughput ratio);
5. when a candidate misses only the accuracy/fidelity constraint, measures per-layer
   sensitivity (each quantized layer kept in float alone) and keeps the most sensitive layers
   in float, one more at a time, until it fits ("accuracy-aware mixed precision", as Intel
   Neural Compressor's tuning does), recording which layers;
6. judges accuracy and fidelity on held-out samples: with a dataset of at least 2 samples,
   every third one is kept out of calibration and retraining (the candidates' pipelines get
   the other two thirds);
7. when the objective involves latency and the host can stand for the target, re-measures the
   best few candidates head to head with the original (one process, interleaved rounds);
8. picks the best candidate for the objective among those meeting every constraint, never one
   slower than the original on this host when the objective involves latency and the target is
   measurable here (a CPU with the host's kernel-selecting ISA features: AVX2, AVX-512, VNNI,
   AMX, dot-product...); otherwise the report says that the
   target latency is an estimate.

The result is the chosen candidate's ``PipelineResult`` whose report gains an ``auto`` section:
the device, the constraints, the model family, every candidate (failed ones with their reason),
the chosen one and why, the Pareto front (size, latency, fidelity; plot-ready points) and the
cost model's predicted-vs-measured latency on this host. When nothing meets the constraints it
raises ``EngineError("constraints_unsatisfiable")`` with the closest candidate and every
constraint it missed, by how much.


The package: ``plan`` (model family, one planner per device format), ``score`` (metrics,
violations, objective), ``mixed_precision``, ``holdout``, ``confirm`` (head-to-head latency),
``report`` (Pareto front, the choice, the failure) and this module, which runs them in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from service.engine import cost_model
from service.engine.constraints import AutoConstraints, parse_constraints
from service.engine.devices import host_profile, parse_device
from service.engine.devices.host import memory_limit, usable_cores
from service.engine.errors import EngineError
from service.engine.external import has_external
from service.engine.ingest import IngestedModel
from service.engine.inputs import InputPlan, resolve_inputs
from service.engine.limits import EngineLimits
from service.engine.normalise import normalise
from service.engine.pipeline import ingest, load_session, refuse_requantizing, save, scrub
from service.engine.recipe import run_recipe
from service.engine.registry import registered_passes
from service.engine.result import PipelineResult
from service.engine.search.candidate import Candidate, MixedPrecisionRecord
from service.engine.search.confirm import confirm_latency
from service.engine.search.holdout import (
    HoldoutReference,
    evaluation_note,
    holdout_metrics,
    holdout_reference,
    split_holdout,
)
from service.engine.search.mixed_precision import tune_mixed_precision
from service.engine.search.plan import WEIGHT_ONLY, model_family, plan_candidates
from service.engine.search.report import auto_section, chosen_result, fail_unsatisfiable
from service.engine.search.score import (
    SearchContext,
    better,
    bound,
    record_metrics,
    score,
    violations,
)

log = logging.getLogger(__name__)

AUTO_EVAL_SAMPLES = 512  # evaluation samples for auto (accuracy needs more than a recipe job)


def run_candidate(job: dict, check_cancelled: Callable[[], None] | None = None) -> dict:
    """Run one candidate as a recipe job (top level: runs in a worker process too).

    In-process (sequential search) the job's ``check_cancelled`` is passed down so that a
    cancellation stops the candidate between stages; a cancellation is re-raised, any other
    ``EngineError`` makes the candidate a failed one.
    """
    started = time.perf_counter()
    try:
        result = run_recipe(
            Path(job["model_path"]), job["recipe"], Path(job["workdir"]),
            dataset_path=Path(job["dataset_path"]) if job["dataset_path"] else None,
            eval_dataset_path=(Path(job["eval_dataset_path"])
                               if job.get("eval_dataset_path") else None),
            device=job["device"], limits=EngineLimits.model_validate(job["limits"]),
            check_cancelled=check_cancelled or (lambda: None), inputs=job.get("inputs"),
        )
    except EngineError as exc:
        if exc.code == "cancelled":
            raise
        return {"ok": False, "error": exc.to_dict(), "seconds": time.perf_counter() - started}
    except Exception as exc:  # a library bug in one candidate must not stop the search
        log.exception("auto candidate failed")
        return {"ok": False, "seconds": time.perf_counter() - started,
                "error": {"code": "pass_failed", "message": f"{type(exc).__name__}: {exc}"[:300]}}
    return {"ok": True, "result": result, "seconds": time.perf_counter() - started}


# The least memory a parallel candidate process gets (it imports numpy, onnx and ONNX
# Runtime, then builds sessions): fewer processes run rather than each with less.
MIN_CANDIDATE_BYTES = 1 << 30


def memory_plan(requested: int, cores: int, space: tuple[int, int] | None) -> tuple[int, int | None]:
    """(processes, bytes each) for a parallel search: at most ``cores`` processes, and one
    memory budget for the whole job (``space``: ``devices.host.memory_limit()``). The job's
    memory limit, less what this process
    already uses, is split evenly between this process and the candidates (so their sum stays
    within the limit the worker set for the job); fewer processes if a share would be below
    ``MIN_CANDIDATE_BYTES``. Bytes is None without a limit."""
    workers = max(1, min(requested, cores))
    if space is None:
        return workers, None
    limit, used = space
    free = max(0, limit - used)
    workers = max(1, min(workers, free // MIN_CANDIDATE_BYTES - 1))
    return workers, free // (workers + 1)


def _limit_candidate(share: int | None) -> None:
    """In a candidate process: its share of the job's memory, for good (hard limit too)."""
    import resource

    if share is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (share, share))


@dataclass
class Prepared:
    """The model every candidate starts from, and the data split they share."""

    ingested: IngestedModel  # the upload as ingested (held-out metrics run on it)
    model: onnx.ModelProto  # normalised
    original_path: Path  # the normalised model on disk
    given: dict[str, Any]
    dataset: dict | None = None  # the train split (calibration, retraining)
    labels: Any = None
    holdout: dict | None = None
    holdout_labels: Any = None
    run_dataset_path: Path | None = None  # what the candidates calibrate on
    holdout_path: Path | None = None  # what the candidates evaluate on
    split_record: dict | None = None


def _prepare(
    model_path: Path, workdir: Path, limits: EngineLimits, cons: AutoConstraints,
    dataset_path: Path | None, inputs: dict[str, Any] | None,
    check_cancelled: Callable[[], None], progress: Callable[[str, float], None],
) -> Prepared:
    """Ingest once, refuse a quantized model, split the dataset, normalise."""
    from service.engine.dataset import load_dataset

    progress("ingest", 0.0)
    directory = workdir / "auto_input"
    ingested, given = ingest(Path(model_path), directory, limits, inputs)
    if ingested.description["already_quantized"]:
        refuse_requantizing(ingested.description, "auto mode compresses float models. Send the "
                            "float model.")
    prepared = Prepared(ingested, ingested.model, directory / "normalised.onnx", given)
    if dataset_path is not None:
        dataset, labels = load_dataset(Path(dataset_path), ingested.model, limits)
        (prepared.dataset, prepared.labels, prepared.holdout, prepared.holdout_labels,
         train_path, prepared.holdout_path, prepared.split_record) = split_holdout(
            ingested.model, dataset, labels, directory)
        prepared.run_dataset_path = train_path or dataset_path
    if cons.max_accuracy_drop is not None and prepared.labels is None:
        raise EngineError(
            "invalid_constraints",
            "max_accuracy_drop needs a dataset with labels; without labels use min_fidelity",
            {"errors": [{"field": "max_accuracy_drop", "message": "needs dataset labels"}]})
    check_cancelled()
    progress("normalise", 0.03)
    prepared.model, _notes = normalise(ingested.model, limits)
    save(prepared.model, prepared.original_path)
    return prepared


@dataclass
class _Search:
    """The candidates, the best one so far, and how each is run and judged."""

    prepared: Prepared
    ctx: SearchContext
    cands: list[Candidate]
    workdir: Path
    model_path: Path
    device_arg: dict
    limits: EngineLimits  # the candidates' (more evaluation samples than a recipe job)
    progress: Callable[[str, float], None]
    check_cancelled: Callable[[], None]
    job_inputs: dict | None = None
    best: Candidate | None = None
    stop_reason: str | None = None
    total: int = 0
    done_count: int = 0
    workers: int = 1
    memory_share: int | None = None  # memory (RLIMIT_DATA) of each parallel candidate process
    mixed_precision: list[MixedPrecisionRecord] = field(default_factory=list)
    holdout_ref: HoldoutReference | None = None  # the original on the held-out samples

    def job(self, cand: Candidate) -> dict:
        p = self.prepared
        return {"model_path": str(self.model_path), "recipe": cand.recipe,
                "workdir": str(self.workdir / "candidates"
                               / f"{self.cands.index(cand):02d}_{cand.name}"),
                "dataset_path": str(p.run_dataset_path) if p.run_dataset_path else None,
                "eval_dataset_path": str(p.holdout_path) if p.holdout_path else None,
                "device": self.device_arg, "limits": self.limits.model_dump(mode="json"),
                "inputs": self.job_inputs}

    def finish(self, cand: Candidate, outcome: dict) -> None:
        """Record a candidate's outcome: its metrics, its violations, the best so far."""
        ctx, p = self.ctx, self.prepared
        self.done_count += 1
        self.progress(f"search:{cand.name}", 0.05 + 0.8 * self.done_count / max(self.total, 1))
        if not outcome["ok"]:
            cand.status, cand.error = "failed", outcome["error"]
            cand.metrics = {"build_seconds": round(outcome["seconds"], 2)}
            return
        result: PipelineResult = outcome["result"]
        cand.result = result
        if ctx.original_estimate is None:
            shapes = result.report.get("latency", {}).get("input_shapes")
            ctx.input_shapes = shapes
            ctx.original_estimate = cost_model.estimate(p.original_path, ctx.profile,
                                                        input_shapes=shapes)
        record_metrics(cand, result, ctx)
        if p.holdout is not None:
            if self.holdout_ref is None:
                self.holdout_ref = holdout_reference(p.original_path, p.ingested.model,
                                                     p.holdout, p.holdout_labels, self.limits)
            holdout_metrics(cand, self.holdout_ref, self.limits)
        cand.metrics["build_seconds"] = round(outcome["seconds"], 2)
        cand.status = "ok"
        cand.violations = violations(cand, ctx)
        if not cand.violations and (self.best is None or better(cand, self.best, ctx)):
            self.best = cand

    def unbeatable(self, pending: list[Candidate]) -> bool:
        if self.best is None:
            return False
        primary = score(self.best, self.ctx)[0]
        return all(bound(c, self.ctx) >= primary for c in pending)

    def _stop(self) -> None:
        assert self.best is not None
        self.stop_reason = (f"{self.best.name} meets every constraint and no remaining "
                            f"candidate can beat it on {self.ctx.constraints.objective}")

    def run_planned(self) -> None:
        """Every planned candidate, most promising first, in parallel processes when the host
        has the cores, until one meets the constraints and none left can beat it."""
        runnable = [c for c in self.cands if c.status == "pending"]
        requested = self.ctx.constraints.workers or max(1, usable_cores() // 4)
        workers, share = memory_plan(min(requested, len(runnable)) or 1, usable_cores(),
                                     memory_limit())
        self.workers = workers
        self.memory_share = share
        self.total = len(runnable)
        pending = sorted(runnable, key=lambda c: bound(c, self.ctx))
        if self.workers <= 1:
            for index, cand in enumerate(list(pending)):
                self.check_cancelled()
                if self.unbeatable(pending[index:]):
                    self._stop()
                    break
                self.progress(f"search:{cand.name}",
                              0.05 + 0.8 * self.done_count / max(self.total, 1))
                self.finish(cand, run_candidate(self.job(cand), self.check_cancelled))
        else:
            import resource

            saved = resource.getrlimit(resource.RLIMIT_DATA)
            space = memory_limit()
            if share is not None and space is not None:
                # Meanwhile this process keeps what it has plus one share: it and the
                # candidates together stay within the job's limit.
                resource.setrlimit(resource.RLIMIT_DATA,
                                   (min(saved[0], space[1] + share), saved[1]))
            try:
                self._run_parallel(pending, share)
            finally:
                resource.setrlimit(resource.RLIMIT_DATA, saved)
        for cand in self.cands:
            if cand.status == "pending":
                cand.status = "not_run"
                cand.error = {"code": "early_stop", "message": self.stop_reason or "not run"}

    def _run_parallel(self, pending: list[Candidate], share: int | None) -> None:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=self.workers,
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_limit_candidate, initargs=(share,)) as pool:
            queue = list(pending)
            running: dict[Future, Candidate] = {}
            while queue or running:
                self.check_cancelled()
                if queue and self.unbeatable(queue) and self.stop_reason is None:
                    self._stop()
                    queue = []
                while queue and len(running) < self.workers:
                    cand = queue.pop(0)
                    running[pool.submit(run_candidate, self.job(cand))] = cand
                if not running:
                    break
                done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    self.finish(running.pop(fut), fut.result())

    def run_extra(self, cand: Candidate) -> None:
        """A candidate added after planning (mixed precision)."""
        self.cands.append(cand)
        self.total += 1
        self.finish(cand, run_candidate(self.job(cand), self.check_cancelled))

    def try_mixed_precision(self, passes: dict[str, Any]) -> None:
        """Accuracy-aware mixed precision for the best two candidates that miss only the
        accuracy/fidelity constraint, until one fits."""
        ctx, p = self.ctx, self.prepared
        fid_only = [c for c in self.cands if c.status == "ok" and c.violations and all(
            v["constraint"].startswith(("max_accuracy_drop", "min_fidelity"))
            for v in c.violations)]
        fid_only.sort(key=lambda c: score(c, ctx))
        for cand in fid_only[:2]:
            self.check_cancelled()
            self.progress("search:mixed_precision", 0.86)
            recipe, record = tune_mixed_precision(
                cand, p.model, p.dataset, p.labels, ctx, passes, self.limits,
                self.workdir / "mixed_precision", self.check_cancelled,
                eval_data=(p.holdout, p.holdout_labels) if p.holdout is not None else None)
            self.mixed_precision.append(record)
            if recipe is None:
                continue
            best_before = self.best
            self.run_extra(Candidate(
                f"{cand.name}+mixed_precision", recipe, cand.formats,
                f"{cand.name} with the {len(record['kept_float'])} most sensitive layers kept "
                "in float", cand.size_factor, cand.speed_bound, mixed_precision=record))
            if self.best is not best_before:
                break

    def confirm(self) -> dict | None:
        """Head-to-head re-measurement of the finalists on this host (one process,
        interleaved rounds, twice as many as a single candidate got); the choice rests on
        these numbers."""
        p = self.prepared
        self.check_cancelled()
        self.progress("search:confirm", 0.9)
        confirmation = confirm_latency(self.cands, self.ctx, p.original_path, p.ingested.model,
                                       p.dataset, p.labels, self.limits, self.check_cancelled)
        if confirmation is not None:
            self.best = None
            for cand in self.cands:
                if cand.status == "ok":
                    cand.violations = violations(cand, self.ctx)
                    if not cand.violations and (self.best is None
                                                or better(cand, self.best, self.ctx)):
                        self.best = cand
        return confirmation


def run_auto(
    model_path: Path,
    workdir: Path,
    *,
    dataset_path: Path | None = None,
    device: dict | str | None = None,
    constraints: dict | None = None,
    progress: Callable[[str, float], None] = lambda stage, fraction: None,
    check_cancelled: Callable[[], None] = lambda: None,
    resolve_model: Callable[[str], Path] | None = None,
    limits: EngineLimits | None = None,
    inputs: dict[str, Any] | None = None,
) -> PipelineResult:
    """Search compression candidates for ``device`` under ``constraints``; return the best.

    Returns a ``PipelineResult`` (the chosen candidate, its model copied to
    ``workdir/output/model.onnx``) whose report has an ``auto`` section (see the module
    docstring). Raises ``EngineError``: ``invalid_device``/``unknown_device``,
    ``invalid_constraints``, the ingest codes, ``already_quantized``, ``cancelled`` (from
    ``check_cancelled``) and ``constraints_unsatisfiable`` with the closest candidate.

    Without a dataset, the inputs (``inputs`` given with the job, the rest probed) are
    resolved once here and handed to every candidate as given shapes and values.
    """
    started = time.perf_counter()
    workdir = Path(workdir)
    limits = limits or EngineLimits()
    profile = parse_device(device) if device is not None else host_profile()
    cons = parse_constraints(constraints)
    host = host_profile()
    # Measured only where this host runs the target's kernels (same ISA features), else the
    # cost model's estimate decides latency.
    measurable = profile.name == "host" or profile.same_kernels_as(host)

    prepared = _prepare(model_path, workdir, limits, cons, dataset_path, inputs,
                        check_cancelled, progress)
    family = model_family(prepared.model)
    passes = registered_passes()
    cands, skipped = plan_candidates(
        profile, family, has_dataset=prepared.dataset is not None, available=set(passes),
        max_candidates=cons.max_candidates, training=cons.training,
        external=has_external(prepared.model))
    if not cands:
        raise EngineError(
            "constraints_unsatisfiable",
            f"no compression technique available for {profile.name} fits this model",
            {"device": profile.name, "skipped": skipped, "closest": None, "missed": []})

    eval_limits = limits.model_copy(update={"eval_samples": max(
        limits.eval_samples,
        AUTO_EVAL_SAMPLES if prepared.dataset is not None else limits.eval_samples)})
    ctx = SearchContext(profile, cons, measurable, decoder=family["family"] == "decoder")
    if prepared.dataset is None:
        ctx.inputs = resolve_once(prepared.model, prepared.original_path, prepared.given,
                                  eval_limits, workdir, check_cancelled)
    search = _Search(prepared, ctx, cands, workdir, Path(model_path),
                     profile.model_dump(mode="json"), eval_limits, progress, check_cancelled,
                     job_inputs=ctx.inputs.as_inputs() if ctx.inputs is not None else None)
    search.run_planned()
    # Weight-only int8 is planned for every model; where latency counts, a faster candidate
    # that missed only fidelity may still beat it once its sensitive layers stay float.
    if search.best is None or (search.best.name == WEIGHT_ONLY
                               and cons.objective in ("latency", "balanced")):
        search.try_mixed_precision(passes)
    confirmation = None
    if measurable and cons.objective in ("latency", "balanced"):
        confirmation = search.confirm()

    section = auto_section(
        cands, ctx, host, prepared.original_path, family, skipped, search.device_arg,
        evaluation=evaluation_note(prepared.dataset, prepared.holdout, prepared.split_record),
        stop_reason=search.stop_reason, mixed_precision=search.mixed_precision,
        workers=search.workers, confirmation=confirmation,
        seconds=time.perf_counter() - started)
    # One memory budget for the job's processes (memory_plan): what each candidate got.
    section["memory_per_worker_bytes"] = search.memory_share
    if search.best is None:
        fail_unsatisfiable(cands, ctx, section)
    assert search.best is not None
    progress("report", 0.95)
    result = chosen_result(search.best, cands, ctx, section, confirmation, workdir,
                           has_holdout=prepared.holdout is not None)
    progress("report", 1.0)
    return result


def resolve_once(
    model: onnx.ModelProto, path: Path, given: dict, limits: EngineLimits, workdir: Path,
    check_cancelled: Callable[[], None],
) -> InputPlan:
    """The inputs every candidate is evaluated on (probed once on the normalised original)."""
    session = load_session(path, limits, workdir)
    return resolve_inputs(model, session, given, scrub=lambda text: scrub(text, workdir),
                          check_cancelled=check_cancelled)

