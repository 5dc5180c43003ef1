"""The HTTP API: a stateless Flask app. ``create_app(settings=None)`` is the only entry point.

Run it with gunicorn: ``gunicorn -c service/api/gunicorn_conf.py 'service.api:create_app()'``.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask, g, request

from service.config import Settings, limits_for
from service.jobs.events import JobEvents


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from ``settings`` (default: read from the environment)."""
    from service.api import (
        auth,
        datasets,
        devices,
        health,
        jobs,
        json_body,
        models,
        problems,
        uploads,
        webhook_secret,
    )
    from service.api.context import Services
    from service.metrics import ServiceMetrics
    from service.queue import JobQueue, create_celery_app
    from service.storage.s3 import make_store

    settings = settings or Settings()
    limits = limits_for(settings)
    logging.basicConfig(level=settings.log_level.upper())
    app = Flask(__name__)
    # Werkzeug refuses bodies past this before reading them (multipart overhead allowed).
    app.config["MAX_CONTENT_LENGTH"] = limits.request_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = limits.form_memory_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]

    store = make_store(settings)
    metrics = ServiceMetrics()
    app.extensions["edgepress"] = Services(
        settings=settings,
        root_store=store,
        queue=JobQueue(create_celery_app(settings), settings),
        metrics=metrics,
        events=JobEvents.from_settings(settings),
        waiters=(threading.BoundedSemaphore(settings.long_poll_max_waiters)
                 if settings.long_poll_max_waiters > 0 else None),
        inspections=threading.BoundedSemaphore(settings.inspect_concurrency),
    )

    problems.init_app(app)
    json_body.init_app(app, settings)
    auth.init_app(app, settings)
    for module in (health, models, datasets, uploads, jobs, devices, webhook_secret):
        app.register_blueprint(module.bp)

    @app.before_request
    def _start_timer() -> None:
        g.edgepress_started = time.perf_counter()

    @app.after_request
    def _record(response):  # type: ignore[no-untyped-def]
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        started = g.get("edgepress_started")
        if started is not None:
            metrics.http_latency.labels(route, request.method).observe(
                time.perf_counter() - started
            )
        metrics.http_requests.labels(route, request.method, str(response.status_code)).inc()
        return response

    return app


__all__ = ["create_app"]
