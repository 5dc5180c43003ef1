"""Worker entry point: ``celery -A service.worker.entry worker -Q edgepress.jobs``."""

from service.worker.app import create_worker_app

app = create_worker_app()
