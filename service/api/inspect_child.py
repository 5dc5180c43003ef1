"""Child process that inspects one upload: ``python -m service.api.inspect_child SPEC_JSON``.

Parsing a stranger's protobuf or archive happens here, under memory and CPU limits set by the
parent (``service.api.inspection``), so a hostile file can neither bloat nor crash the API's
own worker processes. The verdict is one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.uploads.records import UPLOAD_KINDS


def main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    kind = UPLOAD_KINDS[spec["kind"]]
    try:
        from service.engine.errors import EngineError
        from service.engine.limits import EngineLimits

        limits = EngineLimits(**spec["limits"])
        description = kind.inspector(Path(spec["path"]), spec.get("filename"), limits)
        print(json.dumps({"ok": True, "description": description}, default=str))
        return 0
    except MemoryError:
        print(
            json.dumps(
                {
                    "ok": False,
                    "error": {
                        "code": kind.out_of_memory_code,
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
