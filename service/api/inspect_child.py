"""Child process that inspects one upload: ``python -m service.api.inspect_child SPEC_JSON``.

Parsing a stranger's protobuf or archive happens here, under the memory, CPU and file-size
limits the parent chose (``service.api.inspection``; the spec's ``rlimits``), set here before
the upload is opened, so a hostile file can neither bloat nor crash the API's own worker
processes nor fill its disk. The verdict is one JSON line on stdout.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from service.uploads.records import UPLOAD_KINDS


def main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    for name, (soft, hard) in spec.get("rlimits", {}).items():  # before the upload is read
        resource.setrlimit(getattr(resource, name), (soft, hard))
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
