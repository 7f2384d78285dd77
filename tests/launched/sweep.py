"""Run by tests/test_sharding.py under `mlx.launch`: a KL sweep of the pairs in a file, shared
among the launched ranks; rank 0 writes the result. An error is printed by every rank, which
then exits normally, so the test sees each rank's error rather than the launcher stopping them.

Usage: sweep.py PAIRS.jsonl OUT.json POSITION
"""

import sys

import mlx.core as mx

import mlxterp
from mlxterp import InterpretableModel
from mlxterp.errors import MlxterpError

pairs, out, position = sys.argv[1], sys.argv[2], int(sys.argv[3])
group = mx.distributed.init()
model = InterpretableModel(*mlxterp.load("smollm2-135m", dtype="float32"))
try:
    result = model.patching_sweep(pairs=pairs, metric="kl", layers=[0, 9, 29], position=position,
                                  group=group)
except MlxterpError as err:
    print(f"rank {group.rank()} raised {type(err).__name__}: {err}", flush=True)
    sys.exit(0)
if group.rank() == 0:
    result.to_json(out)
