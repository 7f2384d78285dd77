"""Run by tests/test_sharding.py under `mlx.launch`: a KL sweep of the pairs in a file, shared
among the launched ranks; rank 0 writes the result. An error is printed by every rank, which
then exits normally, so the test sees each rank's error rather than the launcher stopping them.

Usage: sweep.py PAIRS.jsonl OUT.json POSITION [FAILING_PAIR]

With FAILING_PAIR, the runner raises on the rank that runs that pair (a fault on one rank only).
"""

import sys

import mlx.core as mx

import mlxterp
from mlxterp import InterpretableModel
from mlxterp.errors import MlxterpError
from mlxterp.experiments.analyses import patching

pairs, out, position = sys.argv[1], sys.argv[2], int(sys.argv[3])
if len(sys.argv) > 4:
    failing, run_engine = int(sys.argv[4]), patching.run_engine

    def failing_engine(model, plan, *args):
        if failing in plan.numbers:
            raise MlxterpError(f"pair {failing}: a fault on this rank alone")
        return run_engine(model, plan, *args)

    patching.run_engine = failing_engine
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
