"""Errors raised by the engine, each with a stable machine code.

The worker turns an ``EngineError`` into a failed job with ``{code, message}``; the API turns one
raised while inspecting an upload into a problem+json response. Messages are written for the
user: no paths on the server, no secrets.
"""

from __future__ import annotations


class EngineError(Exception):
    """A failure the user can act on (bad model, bad dataset, unsupported input, unmet goal).

    ``code`` is stable and documented (snake_case); ``message`` says what went wrong and, where
    possible, what to send instead. ``details`` carries machine-readable extras (JSON-able).
    """

    def __init__(self, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict:
        out: dict = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out
