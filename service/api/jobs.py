"""``/v1/jobs``: submit, follow, list, cancel, delete, and fetch artifacts.

The API only records and enqueues: compression runs in the workers. The record is written
before the message is sent, so a lost message is recovered by the workers' reconciler.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Blueprint, Response, jsonify, redirect, request, url_for
from werkzeug.wrappers import Response as WerkzeugResponse

from service.api.context import services, space
from service.api.idempotency import idempotent
from service.api.pagination import page_cursor, page_limit
from service.api.problems import from_engine_error
from service.api.quotas import check_job_quota, check_storage_quota
from service.api.schemas import parse_body
from service.engine.devices import parse_device
from service.engine.errors import EngineError
from service.engine.inputs import check_inputs, slots_from_description
from service.engine.registry import parse_recipe
from service.errors import Conflict, NotFound, Unavailable, ValidationFailed
from service.jobs import lifecycle
from service.jobs.record import Job, JobState, new_job_id, utcnow
from service.jobs.store import artifact_key, bare_etag
from service.schemas import JobCreate
from service.uploads.records import DATASET, MODEL, DatasetRecord, ModelRecord
from service.webhooks import check_callback_url

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


@bp.post("")
@idempotent
def create_job() -> tuple[Response, int, dict[str, str]]:
    svc = services()
    spec = parse_body(JobCreate)
    model = space().uploads.get(MODEL, spec.model_id)
    dataset = space().uploads.get(DATASET, spec.dataset_id) if spec.dataset_id else None
    if dataset is not None:
        _check_dataset_matches(dataset, model)
    if spec.inputs:
        try:
            check_inputs(spec.inputs, slots_from_description(model.inputs))
        except EngineError as exc:
            raise ValidationFailed(exc.message, code="invalid_inputs",
                                   extra={"errors": exc.details.get("errors", [])}) from None
    try:
        if spec.recipe != "auto":
            parse_recipe(spec.recipe)
        device = parse_device(spec.device)
        if spec.callback_url is not None:
            check_callback_url(spec.callback_url, svc.settings)
    except EngineError as exc:
        raise from_engine_error(exc) from None
    check_job_quota()
    check_storage_quota(0)  # a tenant past its storage quota makes no more artifacts
    job = Job(
        id=new_job_id(),
        model_id=model.id,
        dataset_id=dataset.id if dataset else None,
        device=spec.device if isinstance(spec.device, dict) else device.name,
        recipe=spec.recipe,
        constraints=spec.constraints.model_dump(exclude_none=True),
        inputs={name: i.model_dump(exclude_none=True) for name, i in spec.inputs.items()},
        callback_url=spec.callback_url,
        created_at=utcnow(),
    )
    space().jobs.create(job)
    svc.metrics.jobs_submitted.inc()
    try:
        svc.queue.enqueue(job.id, space().tenant)
    except Unavailable:
        # The record is the truth: the reconciler re-enqueues queued jobs once the broker is back.
        log.warning("job %s recorded but not enqueued; the reconciler will enqueue it", job.id)
    location = url_for("jobs.get_job", job_id=job.id)
    return jsonify(job.public()), 202, {"Location": location}


def _check_dataset_matches(dataset: DatasetRecord, model: ModelRecord) -> None:
    inputs = {i["name"] for i in model.inputs}
    arrays = set(dataset.arrays) - {"labels"}
    # a decoder's token dataset may hold its ids alone: the engine makes the rest from them
    derived = set((model.decoder or {}).get("inputs_from_ids") or [])
    missing = sorted(inputs - arrays - derived)
    unknown = sorted(arrays - inputs)
    if missing or unknown:
        raise ValidationFailed(
            f"dataset {dataset.id} does not match model {model.id}: "
            f"missing inputs {missing}, unknown arrays {unknown}",
            code="dataset_mismatch",
            extra={
                "errors": [
                    {
                        "field": "dataset_id",
                        "message": "array names must be the model's input names",
                    }
                ]
            },
        )


_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d{1,6})(?:$|[,;\s])", re.IGNORECASE)


def _requested_wait() -> int | None:
    """Seconds of RFC 7240 ``Prefer: wait=N`` on this request, if any."""
    match = _WAIT.search(" " + request.headers.get("Prefer", "") + " ")
    return int(match.group(1)) if match else None


@bp.get("/<job_id>")
def get_job(job_id: str) -> Response:
    """The job's record, with its ``ETag``. ``If-None-Match`` with that tag answers 304 while
    the record is unchanged; adding ``Prefer: wait=N`` holds the request until the record
    changes (or the job is finished, or N seconds pass), so a client hears of each change at
    once instead of polling. Held requests are bounded per process; beyond the bound, and
    past ``long_poll_max_seconds``, the request is answered at once (``Preference-Applied``
    tells which)."""
    svc = services()
    jobs = space().jobs
    seen = request.headers.get("If-None-Match")
    wait = min(_requested_wait() or 0, svc.settings.long_poll_max_seconds)
    headers: dict[str, str] = {}
    if wait > 0 and svc.waiters is not None and svc.waiters.acquire(blocking=False):
        try:
            job, tag = jobs.get_if_changed(job_id, seen, wait)
        finally:
            svc.waiters.release()
        headers["Preference-Applied"] = f"wait={wait:g}"
    else:
        job, tag = jobs.get_with_etag(job_id)
    headers["ETag"] = f'"{bare_etag(tag)}"'
    headers["Vary"] = "Prefer, If-None-Match"
    if seen is not None and bare_etag(tag) == bare_etag(seen):
        return Response(status=304, headers=headers)
    response = jsonify(job.public())
    response.headers.update(headers)
    return response


@bp.get("")
def list_jobs() -> Response:
    state_arg = request.args.get("state")
    state = None
    if state_arg:
        try:
            state = JobState(state_arg)
        except ValueError:
            raise ValidationFailed(
                f"unknown state {state_arg!r}",
                extra={
                    "errors": [
                        {
                            "field": "state",
                            "message": "one of " + ", ".join(s.value for s in JobState),
                        }
                    ]
                },
            ) from None
    jobs, cursor = space().jobs.page(
        limit=page_limit(), cursor=page_cursor(), state=state
    )
    return jsonify({"items": [j.public() for j in jobs], "next_cursor": cursor})


@bp.post("/<job_id>/cancel")
@idempotent
def cancel_job(job_id: str) -> tuple[Response, int]:
    """A queued job is cancelled at once; a running one is asked to stop (the worker stops
    its engine process within seconds and marks it cancelled)."""
    svc = services()
    done = lifecycle.cancel(space().jobs, job_id)
    job = done.job
    if done.ended:
        # Finished here, while queued (a running job is finished by its worker).
        svc.metrics.jobs_finished.labels("cancelled").inc()
        if job.callback_url:
            svc.queue.enqueue_webhook(job.id, space().tenant)
    return jsonify(job.public()), 202 if job.state is JobState.running else 200


@bp.delete("/<job_id>")
def delete_job(job_id: str) -> tuple[Response | str, int]:
    job = space().jobs.get(job_id)
    if not job.state.terminal:
        raise Conflict("only finished jobs can be deleted; cancel it first", code="job_active")
    space().jobs.delete(job)
    return "", 204


@bp.get("/<job_id>/artifacts")
def list_artifacts(job_id: str) -> Response:
    job = space().jobs.get(job_id)
    items: list[dict[str, Any]] = [
        {"name": name, "url": url_for("jobs.get_artifact", job_id=job.id, name=name)}
        for name in job.artifacts
    ]
    return jsonify({"items": items, "next_cursor": None})


@bp.get("/<job_id>/artifacts/<name>")
def get_artifact(job_id: str, name: str) -> WerkzeugResponse:
    """Redirect (302) to a short-lived presigned URL on the object store."""
    job = space().jobs.get(job_id)
    if name not in job.artifacts:
        raise NotFound(f"job {job_id} has no artifact {name!r}", code="artifact_not_found")
    # report.html is shown in the browser; the rest downloads as a file.
    url = space().store.presign_get(
        artifact_key(job.id, name), filename=None if name == "report.html" else f"{job.id}-{name}"
    )
    resp = redirect(url, code=302)
    resp.headers["Cache-Control"] = "no-store"
    return resp
