# Source this on the lent GPU machine in the second run (see scripts/gpu_prepare.sh):
#   source scripts/gpu_install.sh
# It joins the two halves of MLX's CUDA wheel (the first carried to /root/wheels by run 1),
# installs every carried wheel into /root/site without an index or dependencies (the machine's
# image already has CUDA's libraries, torch and transformers), and exports PYTHONPATH with
# /root/site and this checkout, so `python3 -c "import mlxterp"` works. It returns non-zero,
# leaving the caller's shell options alone, if a step fails.
mkdir -p /root/wheels && cp .gpu/part2/* /root/wheels/ || return 1
for first in /root/wheels/*.whl.part00; do
  [ -e "$first" ] || continue  # already joined by an earlier run on this machine
  cat "$first" "${first%.part00}.part01" > "${first%.part00}" && rm "$first" "${first%.part00}.part01" \
    || return 1
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /root/site /root/wheels/*.whl || return 1
export PYTHONPATH="/root/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, 'on', mx.default_device())"
