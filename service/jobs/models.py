"""Old name of ``service.jobs.record``, kept only for ``service/uploads/store.py`` and
``service/api/uploads.py`` (the upload restructure's files) until they import
``service.jobs.record``; delete it then."""

from service.jobs.record import utcnow

__all__ = ["utcnow"]
