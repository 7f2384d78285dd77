"""Plans shared among the processes of an `mx.distributed` group (started by `mlx.launch`).

Every rank holds the same plans and computes the same assignment of their work: units of one
pair and a slice of its sites (pairs are split into slices of sites only when there are fewer
pairs than ranks), given to ranks by their cost so that each rank has about as much. Each rank
runs its units with the ordinary runner, then the ranks exchange results with two collectives:

1. a flag: did any rank fail? If so, every rank raises: the failing rank its own error, the others
   a `RankFailedError` with that error's text. No rank is left waiting in a collective that a
   failed rank never joins.
2. all values, gathered bit for bit (float64 sent as uint32 words), from which each rank takes
   every unit's values from the rank that ran it.

A rank that dies (killed, out of memory) breaks the ring's connections: the others' collective
raises, and `mlx.launch` stops them.

Example:
    >>> group = mx.distributed.init()
    >>> values, resources = run_sharded(lambda plan: run_engine(model, plan), [plan], group)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxterp.errors import NoisyBaselineWarning, RankFailedError
from mlxterp.experiments.pipeline.plan import Plan, SweepValues

MESSAGE_BYTES = 4096  # of an error's text sent to the other ranks


@dataclass(frozen=True)
class Unit:
    """One rank's piece of work: pair `pair` of plan `plan`, sites `sites`."""

    plan: int
    pair: int
    sites: slice


def units(plans: list[Plan], ranks: int) -> list[Unit]:
    """Each pair of each plan, its sites split into as many slices as it takes for every rank
    to have a unit (when pairs are fewer than ranks)."""
    total = sum(plan.pairs for plan in plans)
    slices = -(-ranks // total)
    work = []
    for p, plan in enumerate(plans):
        n = len(plan.sites)
        bounds = [n * k // slices for k in range(slices + 1)]
        for pair in range(plan.pairs):
            work += [Unit(p, pair, slice(a, b)) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return work


def assign(plans: list[Plan], work: list[Unit], ranks: int) -> list[int]:
    """The rank of each unit: longest first, each to the least loaded rank (the cost of a unit
    taken as tokens x sites). Every rank computes the same assignment."""
    cost = [plans[u.plan].clean.shape[1] * (u.sites.stop - u.sites.start + 2) for u in work]
    load, owner = [0] * ranks, [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: -cost[i]):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + cost[i]
    return owner


def _run_units(runner, plans: list[Plan], work: list[Unit], mine: list[int]) -> list[SweepValues]:
    """This rank's units run (those of one plan and one site slice in one call), their values in
    full-size arrays (zero where other ranks' units are)."""
    values = [SweepValues.empty(plan.pairs, len(plan.sites)) for plan in plans]
    batches: dict[tuple[int, int, int], list[int]] = {}
    for i in mine:
        u = work[i]
        batches.setdefault((u.plan, u.sites.start, u.sites.stop), []).append(u.pair)
    for (p, start, stop), pairs in batches.items():
        part = runner(plans[p].subset(pairs, slice(start, stop)))
        values[p].place(pairs, slice(start, stop), part)
    return values


def _exchange_failure(group: mx.distributed.Group, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (see the module's docstring)."""
    failed = mx.distributed.all_sum(mx.array([int(error is not None)]), group=group)
    if failed.item() == 0:
        return
    text = b"" if error is None else f"rank {group.rank()}: {type(error).__name__}: {error}".encode()
    buffer = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
    buffer[:min(len(text), MESSAGE_BYTES)] = np.frombuffer(text[:MESSAGE_BYTES], dtype=np.uint8)
    messages = np.array(mx.distributed.all_gather(mx.array(buffer), group=group)).reshape(group.size(), -1)
    if error is not None:
        raise error
    first = next(m for m in messages if m.any())
    raise RankFailedError(bytes(first).rstrip(b"\0").decode(errors="replace"))


def _gather(group: mx.distributed.Group, values: list[SweepValues], owner: list[int],
            work: list[Unit], peak: int) -> tuple[list[SweepValues], int]:
    """Every unit's values from its rank, exactly, and the largest peak memory of any rank."""
    flat = np.concatenate([np.concatenate([a.ravel() for a in vars(v).values()]) for v in values]
                          + [np.array([peak], dtype=np.float64)])
    words = mx.distributed.all_gather(mx.array(flat.view(np.uint32)), group=group)
    ranks = np.array(words).reshape(group.size(), -1).view(np.float64)  # (ranks, values)
    sources = [_unflatten(flat, values) for flat in ranks]  # each rank's values, as SweepValues
    gathered = [SweepValues.empty(v.clean.shape[0], v.patched.shape[1]) for v in values]
    for unit, rank in zip(work, owner, strict=True):
        source = sources[rank][unit.plan]
        gathered[unit.plan].place([unit.pair], unit.sites, source.subset([unit.pair], unit.sites))
    return gathered, int(ranks[:, -1].max())


def _unflatten(flat: np.ndarray, like: list[SweepValues]) -> list[SweepValues]:
    out, offset = [], 0
    for v in like:
        arrays = {}
        for name, array in vars(v).items():
            arrays[name] = flat[offset:offset + array.size].reshape(array.shape)
            offset += array.size
        out.append(SweepValues(**arrays))
    return out


def run_sharded(runner, plans: list[Plan], group: mx.distributed.Group | None = None
                ) -> tuple[SweepValues, dict]:
    """The values of every pair of the plans, in the order of their `numbers`, the work shared
    among `group`'s ranks (None or one rank: all here), and what the run took: {"ranks",
    "peak_memory_bytes" (the largest of any rank), "seconds"}.

    `runner(plan) -> SweepValues` is an ordinary runner (the engine, the naive procedure, the
    gradient runner). Float32-noise warnings are given once, on rank 0, for every pair.

    Example:
        >>> values, resources = run_sharded(lambda p: run_engine(model, p), plans, mx.distributed.init())
    """
    start = time.perf_counter()
    mx.reset_peak_memory()
    ranks = 1 if group is None else group.size()
    if ranks == 1:
        values = [runner(plan) for plan in plans]
        return _in_order(plans, values), _resources(1, mx.get_peak_memory(), start)
    work = units(plans, ranks)
    owner = assign(plans, work, ranks)
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyBaselineWarning)  # given once below, by rank 0
        try:
            values = _run_units(runner, plans, work, [i for i, r in enumerate(owner) if r == group.rank()])
        # Any error, so that it reaches the other ranks before they wait for this one; it is
        # raised again here, unchanged.
        except Exception as err:  # noqa: BLE001
            error = err
    _exchange_failure(group, error)
    values, peak = _gather(group, values, owner, work, mx.get_peak_memory())
    if group.rank() == 0:
        for plan, plan_values in zip(plans, values, strict=True):
            for pair in range(plan.pairs):
                plan_values.check_baseline(plan, pair)
    return _in_order(plans, values), _resources(ranks, peak, start)


def _in_order(plans: list[Plan], values: list[SweepValues]) -> SweepValues:
    """The plans' values as one, each pair where its number puts it."""
    merged = SweepValues.empty(sum(plan.pairs for plan in plans), len(plans[0].sites))
    for plan, part in zip(plans, values, strict=True):
        merged.place(list(plan.numbers), slice(None), part)
    return merged


def _resources(ranks: int, peak: int, start: float) -> dict:
    return {"ranks": ranks, "peak_memory_bytes": int(peak), "seconds": round(time.perf_counter() - start, 3)}
