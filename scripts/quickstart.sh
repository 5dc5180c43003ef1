#!/usr/bin/env bash
# The README's first command: environment, local stack (S3 + Redis + API + worker), demo job.
# The stack stays up afterwards; stop it with: .venv/bin/python scripts/stack.py down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python scripts/stack.py up
.venv/bin/python scripts/demo.py --api "${EDGEPRESS_API_URL:-http://127.0.0.1:8080}"
