#!/usr/bin/env bash
# The README's test command (CI runs it through .ci/run): environment, tools, whole suite.
# The tests start their own Redis, API and worker on free loopback ports, and SeaweedFS when
# none listens on 127.0.0.1:8333.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -f scripts/install_tools.sh ]; then bash scripts/install_tools.sh; fi
# House style (STYLE.md): ruff and mypy clean.
.venv/bin/ruff check --quiet .
.venv/bin/mypy --no-error-summary service
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
