#!/usr/bin/env bash
# The README's first command: environment, local stack (S3 + Redis + API + worker), demo job.
# The stack stays up afterwards; stop it with: .venv/bin/python scripts/stack.py down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# A broker: EDGEPRESS_BROKER_URL, a Redis on 127.0.0.1:6379, or redis-server started by the stack.
if [ -z "${EDGEPRESS_BROKER_URL:-}" ] && ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null \
   && ! command -v redis-server >/dev/null 2>&1; then
  echo "no Redis found: installing redis-server (Debian package)" >&2
  if [ "$(id -u)" -eq 0 ]; then apt-get install -y -q redis-server >/dev/null || { apt-get update -q >/dev/null; apt-get install -y -q redis-server >/dev/null; }
  else sudo apt-get install -y -q redis-server >/dev/null; fi
fi
# The API fails closed: a local stack without API keys must say it runs open.
if [ -z "${EDGEPRESS_API_KEYS:-}${EDGEPRESS_API_KEYS_FILE:-}" ]; then
  export EDGEPRESS_AUTH="${EDGEPRESS_AUTH:-open}"
fi
.venv/bin/python scripts/stack.py up
.venv/bin/python scripts/demo.py --api "${EDGEPRESS_API_URL:-http://127.0.0.1:8080}"
