#!/usr/bin/env bash
# The pod's start command (RunPod): install the locked stack when it changed, check it, and exec the
# orchestrator. Usage: bash start.sh [--demo] [extra `dual_orchestrator.py run` arguments]
#   --demo  build tiny random-weight models under DATA_DIR/demo-models (once) and serve them at
#           256x256: the whole job path works on any machine, in seconds on a CPU; pictures are noise.
set -euo pipefail
cd "$(dirname "$0")"

demo=0
if [ "${1:-}" = "--demo" ]; then demo=1; shift; fi
if [ "$demo" = 1 ]; then
  # The demo serves noise from random weights: never on the pod's real queues, storage or callbacks.
  unset REDIS_URL UPSTASH_REDIS_REST_URL UPSTASH_REDIS_REST_TOKEN SUPABASE_URL SUPABASE_SERVICE_KEY \
        SUPABASE_SERVICE_ROLE_KEY CALLBACK_SECRET
fi

# The lock is resolved for CPython 3.11 (tools/lock.sh): its wheels install on no other version.
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "requirements.lock needs Python 3.11; $python is $("$python" -V 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# A venv on the network volume survives pod restarts; elsewhere it lives in the checkout.
if [ -z "${VENV:-}" ]; then
  if [ -d /workspace ] && [ -w /workspace ]; then VENV=/workspace/venv; else VENV=.venv; fi
fi
[ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
want=$(sha256sum requirements.lock | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.lock.sha256" 2>/dev/null || true)" != "$want" ]; then
  echo "installing requirements.lock into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
  echo "$want" > "$VENV/.requirements.lock.sha256"
fi

# The embedded default needs a local redis-server when no REDIS_URL / Upstash is configured.
if [ -z "${REDIS_URL:-}" ] && [ -z "${UPSTASH_REDIS_REST_URL:-}" ] && ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: install it or set REDIS_URL" >&2; exit 1
  fi
fi

if [ "$demo" = 1 ]; then
  export DATA_DIR="${DATA_DIR:-$PWD/data}"
  export MODELS_DIR="$DATA_DIR/demo-models"
  "$VENV/bin/python" -m tools.tiny_models "$MODELS_DIR"
  export JOB_TYPES_FILE="${JOB_TYPES_FILE:-$MODELS_DIR/demo_job_types.yaml}"
fi

exec "$VENV/bin/python" dual_orchestrator.py run "$@"
