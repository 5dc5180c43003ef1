"""Jobs: the record, its state machine and its store on S3."""

from service.jobs.models import Job, JobError, JobState, new_job_id
from service.jobs.store import JobStore

__all__ = ["Job", "JobError", "JobState", "JobStore", "new_job_id"]
