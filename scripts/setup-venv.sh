#!/usr/bin/env bash
# Create .venv (if needed) and install llb-edge with every extra into it. Sourced by demo.sh and test.sh.
# torch/torchvision are pinned first: timm needs torchvision, and these two versions import together
# (PyPI's torchvision does not import beside the small CPU-only torch 2.13.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.llb-edge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[train,runtime,gateway,openvino,demo,dev]"
  touch "$stamp"
fi
