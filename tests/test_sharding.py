"""Sweeps shared among processes: how work is split, and real 2-rank runs over loopback under
`mlxterp launch` (and MLX's own `mlx.launch --backend ring`), checked against the
single-process result."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import WITHOUT_BUNDLED

from mlxterp import InterpretableModel
from mlxterp.experiments.data.pairs import PromptPair, ioi_pairs, save_pairs
from mlxterp.experiments.pipeline.metrics import METRICS
from mlxterp.experiments.pipeline.plan import Plan, SweepValues
from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.experiments.runners.sharding import assign, units
from mlxterp.tracing.names import Site

LAUNCH = Path(sys.executable).with_name("mlx.launch")
SWEEP = Path(__file__).with_name("launched") / "sweep.py"
BIN = Path(sys.executable).parent
# A launched run loads the model in each rank (about 2 s here) and sweeps a few pairs: a minute
# is ample; a hang would never end.
BOUND = 120

launched = pytest.mark.skipif(WITHOUT_BUNDLED, reason="the launched ranks load the bundled model")


def _plan(pairs: int, length: int, sites: int) -> Plan:
    tokens = mx.arange(pairs * length).reshape(pairs, length)
    return Plan(tokens, tokens + 1, tuple(Site(f"model.layers.{i}.mlp") for i in range(sites)), METRICS["kl"])


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_every_site_of_every_pair_is_one_ranks_and_loads_are_even(ranks):
    plans = [_plan(3, 14, 30), _plan(2, 6, 30)]
    work = units(plans, ranks)
    owner = assign(plans, work, ranks)
    covered = {(u.plan, u.pair, site) for u in work for site in range(u.sites.start, u.sites.stop)}
    assert len(covered) == sum(u.sites.stop - u.sites.start for u in work) == 5 * 30
    assert set(owner) == set(range(ranks))  # every rank has work
    loads = np.bincount(owner, [plans[u.plan].clean.shape[1] * (u.sites.stop - u.sites.start) for u in work])
    assert loads.max() <= 1.5 * loads.mean() or ranks > 5  # 8 ranks: 5 pairs split in 2 slices each


def test_one_pair_is_split_by_sites_when_ranks_outnumber_pairs():
    work = units([_plan(1, 14, 30)], 4)
    assert [(u.sites.start, u.sites.stop) for u in work] == [(0, 7), (7, 15), (15, 22), (22, 30)]


def test_values_are_put_back_where_they_came_from():
    rng = np.random.default_rng(0)
    whole = SweepValues(*(rng.normal(size=(4,) if i % 3 < 2 else (4, 6)) for i in range(6)))
    rebuilt = SweepValues.empty(4, 6)
    for pairs, sites in (([0, 2], slice(0, 3)), ([1, 3], slice(0, 3)), ([0, 1, 2, 3], slice(3, 6))):
        rebuilt.place(pairs, sites, whole.subset(pairs, sites))
    for name, array in vars(whole).items():
        np.testing.assert_array_equal(getattr(rebuilt, name), array)


def _free_port() -> int:
    """A port whose successor is free too: the ring listens on one port per rank."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def _launch(command: list[str], cwd: Path, launcher: str = "mlxterp", **kwargs) -> subprocess.Popen:
    """`command` in 2 ranks over loopback, one BLAS thread each, under `mlxterp launch` or
    `mlx.launch`."""
    if launcher == "mlx":
        start = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port())]
    else:
        start = [str(BIN / "mlxterp"), "launch", "-n", "2"]
    return subprocess.Popen([*start, "--env", "OPENBLAS_NUM_THREADS=1", "--", *command],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(process: subprocess.Popen) -> tuple[str, float]:
    start = time.perf_counter()
    out, err = process.communicate(timeout=BOUND)
    return out + err, time.perf_counter() - start


@pytest.fixture(scope="module")
def model(smollm2):
    return InterpretableModel(*smollm2)


@pytest.mark.kernels
@launched
@pytest.mark.slow  # the launcher's own ring is checked in the default run, below
@pytest.mark.parametrize("launcher", ["mlxterp", "mlx"])
def test_two_ranks_give_the_single_process_result(model, tmp_path, launcher):
    """The CLI's `patch --pairs` under `mlxterp launch -n 2` (and `mlx.launch`): one result,
    written and printed by rank 0, equal to the single-process sweep to 0.01 points (the ranks'
    batches differ in layout)."""
    pairs = [*ioi_pairs(3, seed=4), PromptPair("The capital of France is", "The capital of Italy is",
                                                " Paris", " Rome")]
    save_pairs(pairs, tmp_path / "pairs.jsonl")
    output, _ = _finish(_launch([str(BIN / "mlxterp"), "patch", "--pairs", "pairs.jsonl", "--metric",
                                 "logit_diff", "--layers", "0,9,29", "--out", "out"], tmp_path, launcher))
    written = list((tmp_path / "out").glob("*.json"))
    assert len(written) == 1, output
    assert output.count("normalised mean") == 1 and output.count("result saved to") == 1
    sharded = PatchingResult.from_json(written[0])
    alone = model.patching_sweep(pairs=pairs, metric="logit_diff", layers=[0, 9, 29])
    assert sharded.resources["ranks"] == 2 and sharded.resources["peak_memory_bytes"] > 0
    assert sharded.clean == alone.clean and sharded.answers == alone.answers
    np.testing.assert_allclose(sharded.recovery, alone.recovery, atol=0.01)
    np.testing.assert_allclose(sharded.baseline, alone.baseline, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.kernels
@launched
def test_one_pair_is_shared_by_sites(model, tmp_path):
    pair = ioi_pairs(1, seed=2)
    save_pairs(pair, tmp_path / "pair.jsonl")
    output, _ = _finish(_launch([sys.executable, str(SWEEP), "pair.jsonl", "out.json", "-1"], tmp_path))
    sharded = PatchingResult.from_json(tmp_path / "out.json")
    alone = model.patching_sweep(pairs=pair, metric="kl", layers=[0, 9, 29])
    np.testing.assert_allclose(sharded.recovery, alone.recovery, atol=0.01)


@pytest.mark.slow
@launched
def test_an_error_on_one_rank_reaches_every_rank(tmp_path):
    """The runner fails on the rank that runs pair 1 (a fault injected there alone): both ranks
    raise, the other with a RankFailedError carrying the message; none waits for the other."""
    pairs = [PromptPair("When Mary and John went to the store", "When John and Mary went to the store"),
             PromptPair("When Mary and John went to the store", "When Mary and John went to the park")]
    save_pairs(pairs, tmp_path / "pairs.jsonl")
    output, seconds = _finish(_launch([sys.executable, str(SWEEP), "pairs.jsonl", "out.json", "-1", "1"],
                                      tmp_path))
    lines = sorted(line for line in output.splitlines() if " raised " in line)
    assert len(lines) == 2, output
    assert "MlxterpError: pair 1: a fault on this rank alone" in output
    assert any(line.startswith("rank ") and "RankFailedError: rank " in line for line in lines)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
@launched
def test_a_killed_rank_stops_the_run(tmp_path):
    """Kill one rank mid-sweep: the launcher stops the other, within the bound, and no result
    is written."""
    save_pairs(ioi_pairs(16, seed=0), tmp_path / "pairs.jsonl")
    process = _launch([str(BIN / "mlxterp"), "patch", "--pairs", "pairs.jsonl", "--metric", "logit_diff",
                       "--out", "out"], tmp_path)
    ranks = []
    deadline = time.perf_counter() + BOUND
    while len(ranks) < 2 and time.perf_counter() < deadline:
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
        ranks = children.stdout.split()
        time.sleep(0.2)
    assert len(ranks) == 2
    time.sleep(6)  # both ranks have loaded the model and are sweeping (16 pairs take longer)
    assert process.poll() is None, "the run ended before a rank could be killed"
    os.kill(int(ranks[-1]), signal.SIGKILL)
    output, seconds = _finish(process)
    assert seconds < 30, output
    assert "was killed" in output or "exited with code" in output
    assert not list(tmp_path.glob("out/*.json"))


def test_the_launcher_starts_one_ring_and_stops_it_when_a_rank_fails(tmp_path, capfd):
    """`launch` gives each rank its place in one ring (their all_sum sees both), returns 0 when
    all end well, and the failing rank's status when one fails, stopping the other at once
    (that one would sleep for a minute)."""
    from mlxterp import InputError
    from mlxterp.experiments.runners.launch import launch

    ring = ("import os; import mlx.core as mx; g = mx.distributed.init(); "  # one write: lines stay whole
            "total = mx.distributed.all_sum(mx.array([g.rank() + 1])).item(); "
            "os.write(1, f'rank {g.rank()} of {g.size()} sum {total}\\n'.encode())")
    assert launch([sys.executable, "-c", ring], 2) == 0
    out = capfd.readouterr().out
    assert "rank 0 of 2 sum 3" in out and "rank 1 of 2 sum 3" in out
    failing = ("import os, sys, time; rank = int(os.environ['MLX_RANK']); "
               "time.sleep(60) if rank == 0 else sys.exit(3)")
    start = time.perf_counter()
    assert launch([sys.executable, "-c", failing], 2) == 3
    assert time.perf_counter() - start < 30  # not the sleeping rank's minute
    assert "rank 1 exited with code 3; stopping the other ranks" in capfd.readouterr().err
    for bad, message in ((([], 2), "no command to launch"), (([sys.executable], 0), "ranks=0")):
        with pytest.raises(InputError, match=message):
            launch(*bad)
