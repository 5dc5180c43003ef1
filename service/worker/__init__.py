"""The Celery side: the app factory, the job queue, the task that runs a job."""
