# Source this on the lent GPU machine in the second run (see scripts/gpu_prepare.sh):
#   source scripts/gpu_install.sh
# It joins the two halves of MLX's CUDA wheel (the first carried to /root/wheels by run 1),
# installs every carried wheel into /root/site without an index or dependencies (the machine's
# image already has CUDA's libraries, torch and transformers), and exports PYTHONPATH with
# /root/site and this checkout, so `python3 -c "import mlxterp"` works. It returns non-zero,
# leaving the caller's shell options alone, if a step fails.
#
# A folder on PYTHONPATH runs no .pth file, so mlxterp's start-up hook that puts MLX's CPU back
# end on OpenBLAS (mlxterp/blas.py) does not run there: MLX's CPU matmuls would use the wheel's
# reference BLAS, a CPU forward 27x slower (1.4 s against 52 ms on that machine's Xeon,
# 2026-12-06). So the OpenBLAS mlxterp finds goes into LD_PRELOAD, as blas_status()'s fix says.
mkdir -p /root/wheels && cp .gpu/part2/* /root/wheels/ || return 1
for first in /root/wheels/*.whl.part00; do
  [ -e "$first" ] || continue  # already joined by an earlier run on this machine
  cat "$first" "${first%.part00}.part01" > "${first%.part00}" && rm "$first" "${first%.part00}.part01" \
    || return 1
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /root/site /root/wheels/*.whl || return 1
export PYTHONPATH="/root/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Only a library that loads (its own dependencies found) goes into LD_PRELOAD.
openblas=$(MLXTERP_NO_BLAS=1 python3 -c "
import ctypes
from mlxterp.blas import find_openblas
path = find_openblas()
try:
    print(ctypes.CDLL(path) and path if path else '')
except OSError:
    print('')") || return 1
if [ -n "$openblas" ]; then
  export LD_PRELOAD="$openblas${LD_PRELOAD:+:$LD_PRELOAD}"
else
  echo "gpu_install.sh: no OpenBLAS on this machine; MLX's CPU back end runs on its reference BLAS" >&2
fi
python3 -c "from mlxterp.blas import blas_status; print('CPU BLAS:', blas_status().kind)"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, 'on', mx.default_device())"
