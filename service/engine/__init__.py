"""The EdgePress compression engine: a plain library.

It knows nothing about Flask, S3 or Celery: the worker, the CLI, a test or a notebook call it
with files on disk. Importing this package stays light (no onnxruntime, no torch): heavy
libraries are imported inside the passes and the evaluation that need them.
"""

from service.engine.errors import EngineError

__all__ = ["EngineError"]
