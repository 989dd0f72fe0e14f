#!/usr/bin/env bash
# Regenerate requirements.lock and requirements-dev.lock (hashed, for CPython 3.11 on Linux x86_64).
# Needs uv (pip install uv). Run from the repository root: bash tools/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header)
uv pip compile "${common[@]}" requirements.in -o requirements.lock
uv pip compile "${common[@]}" requirements-dev.in -o requirements-dev.lock
