#!/usr/bin/env bash
# Runs the test suite offline on CPU (installs what it needs first). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest "$@"
# The OpenVINO engine's tests run OpenVINO in the test process: they get a pytest process of their own
# (pyproject.toml's openvino marker), run after the suite when no arguments choose the tests.
if [ "$#" -eq 0 ]; then
  python -m pytest -m openvino
fi
