#!/usr/bin/env bash
# Idempotent set-up: a local .venv with torch==2.13.0 (CPU) first, then mirip and its extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${MIRIP_SKIP_SETUP:-0}" = 1 ]; then
  # Your own environment (torch, mirip's dependencies) is already active: use it as it is.
  python() { "${PYTHON:-python3}" "$@"; }
  export -f python 2>/dev/null || true
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  return 0 2>/dev/null || exit 0
fi
venv="${MIRIP_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "mirip: creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.mirip-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and pinned: a bare `torch` requirement would pull a ~5 GB CUDA build.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[dev,plot,serve,judge,openvino]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
