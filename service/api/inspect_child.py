"""Child process that inspects one upload: ``python -m service.api.inspect_child SPEC_JSON``.

Parsing a stranger's protobuf or archive happens here, under memory and CPU limits set by the
parent (``service.api.inspection``), so a hostile file can neither bloat nor crash the API's
own worker processes. The verdict is one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        from service.engine.errors import EngineError
        from service.engine.limits import EngineLimits

        limits = EngineLimits(**spec["limits"])
        path = Path(spec["path"])
        if spec["kind"] == "model":
            from service.engine.ingest import inspect_upload

            description = inspect_upload(path, spec.get("filename"), limits)
        else:
            from service.engine.dataset import inspect_dataset

            description = inspect_dataset(path, limits)
        print(json.dumps({"ok": True, "description": description}, default=str))
        return 0
    except MemoryError:
        print(
            json.dumps(
                {
                    "ok": False,
                    "error": {
                        "code": "model_too_large" if spec["kind"] == "model" else "invalid_dataset",
                        "message": "inspecting the upload needs more memory than this server allows",
                    },
                }
            )
        )
        return 3
    except EngineError as exc:
        print(json.dumps({"ok": False, "error": exc.to_dict()}, default=str))
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
