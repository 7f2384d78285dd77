#!/usr/bin/env bash
# Prepare, on this machine, what a run on the lent GPU machine needs: it reaches no package
# registry and a run carries at most 64 MiB, while MLX's CUDA wheel alone is about 90 MB.
#
#   scripts/gpu_prepare.sh          # fills .gpu/ (git-ignored): part1/, part2/, model/
#
# Then two runs on the machine, the second at once while it is still warm (30 s):
#   run 1, carry [".gpu/part1"]:
#       mkdir -p /root/wheels && cp .gpu/part1/* /root/wheels/
#   run 2, carry [".gpu/part2", ".gpu/model"]:
#       source scripts/gpu_install.sh && <the work>
# gpu_install.sh joins the two halves of the CUDA wheel, installs every wheel with
# `pip install --no-index --no-deps --target /root/site` and puts that folder on PYTHONPATH.
#
# part1 also carries the peers' wheels (TransformerLens, nnsight and what they need beyond the
# machine's image, which has torch and transformers), and model/ holds SmolLM2's config and
# tokenizer (random weights of its shape are enough for timing; the 98 MB GGUF does not travel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MLX_VERSION=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('mlx'))")
MLX_LM_VERSION=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('mlx-lm'))")

rm -rf .gpu && mkdir -p .gpu/download .gpu/part1 .gpu/part2 .gpu/model
download() {  # wheels for the machine's CPython 3.12 on x86-64 Linux, no dependencies
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$1" "${@:2}"
}
download .gpu/download "mlx-cuda-13==$MLX_VERSION"
download .gpu/part2 "mlx==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION" "gguf==0.19.0"
# The peers, and their needs that the machine's image lacks.
download .gpu/part1 "transformer_lens==4.3.0" datasets dill multiprocess fancy-einsum beartype \
  typeguard "nnsight==0.8.1" greenlet pydantic pydantic-core annotated-types typing-inspection \
  websocket-client zstandard

cuda_wheel=$(ls .gpu/download/mlx_cuda_13-*.whl)
split -n 2 -d "$cuda_wheel" ".gpu/part1/$(basename "$cuda_wheel").part"
mv ".gpu/part1/$(basename "$cuda_wheel").part01" .gpu/part2/
rm -rf .gpu/download

# SmolLM2's shape and tokenizer, from the bundled model's converted folder.
"$PYTHON" - <<'EOF'
import shutil
from pathlib import Path

import mlx.core as mx

from mlxterp.models.load import BUNDLED, cache_dir, converted_folder

folder = converted_folder(BUNDLED["smollm2-135m"].gguf_path(cache_dir()), mx.bfloat16, False)
for file in Path(folder).iterdir():
    if file.suffix != ".safetensors":
        shutil.copy(file, Path(".gpu/model") / file.name)
EOF
du -sh .gpu/part1 .gpu/part2 .gpu/model
