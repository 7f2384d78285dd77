"""The one engine that runs patch sites, and the naive procedure it must agree with.

Both return the metric of every run: clean, corrupted, and one patched run per site and pair.

The engine runs many patches in one forward pass per prompt pair. The batch starts as the clean
and the corrupted prompt; when the forward reaches block l, it appends one copy of the receiving
row (the corrupted one, when denoising) for every site patched in block l, and the patch of each
copied row takes the donor's value from the donor's own row of the same batch, so no activation
cache is needed. Blocks below l are computed once for all the sites of block l and above,
instead of once per site. A row that cannot differ from its receiver before position p (its
patch starts there, or the prompts agree up to there) computes only positions p onwards, its
attention reading the earlier keys and values from the receiver through mlx-lm's cache protocol.
After the last block only the measured position goes on to the unembedding.

This relies on the model calling its block list once each, in order, with the residual stream
as the first argument, and on nothing after the blocks mixing positions; the position reuse also
needs blocks called as `block(x, mask, cache)` whose attention honours mlx-lm's cache protocol
(`offset`, `update_and_fetch`). The engine checks the signature and the order of the calls; where
the blocks are called out of order it warns and puts every row in the batch from the start.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections import defaultdict

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxterp.errors import InputError, MlxterpError, NotReachedError, SiteError
from mlxterp.experiments.pipeline.metrics import measure
from mlxterp.experiments.pipeline.options import DEFAULT_MEMORY_BUDGET
from mlxterp.experiments.pipeline.plan import CORRUPTED, Plan, SweepValues
from mlxterp.experiments.runners.costs import block_costs, called_with_cache
from mlxterp.tracing.intercept import call_input, call_parameters, call_patched, intercepted, with_call_input
from mlxterp.tracing.names import Site, patch_rows

GROW = "grow"  # a site's row joins at its own block, computing only the positions it can change
FLAT = "flat"  # every row joins at the first block, at full length: fewest calls, one shape
WHOLE = "whole"  # every row from the tokens: for models that call their blocks out of order


class _BlocksOutOfOrder(Exception):
    """Raised inside a forward when the model does not call its blocks once each, in order."""


class _KVRecorder:
    """mlx-lm's attention-cache protocol for the full-length rows: keeps keys and values,
    changes nothing."""

    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


class _PrefixKV:
    """The attention-cache protocol for rows that compute only positions start..T-1: keys and
    values of the earlier positions are the receiving run's, and rotary offsets begin at start."""

    def __init__(self, keys: mx.array, values: mx.array, start: int):
        self.keys, self.values, self.offset = keys, values, start

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return (mx.concatenate([self.keys, keys], axis=2),
                mx.concatenate([self.values, values], axis=2))


def _suffix_mask(mask, start: int, length: int):
    """The attention mask of queries start..length-1 over keys 0..length-1."""
    if isinstance(mask, mx.array):
        return mask[..., start:, :]
    if mask is None or mask == "causal":
        return mx.arange(start, length)[:, None] >= mx.arange(length)[None]
    raise MlxterpError(f"unexpected attention mask {mask!r}")


class _BatchedForward:
    """One forward pass of the clean row, the corrupted row and the patched rows of one pair.

    Rows are grouped by `start`, the first position they compute. Start 0 is the model's own
    batch (base rows first); the engine runs each later start's rows through every block beside
    it, on positions start..T-1 only.
    """

    def __init__(self, model, plan: Plan, pair: int, sites: list[Site], strategy: str):
        self.model, self.sites, self.position, self.strategy = model, sites, plan.position, strategy
        self.tokens = plan.tokens(pair)  # (2, T): clean, corrupted
        self.receiver, self.donor = plan.receiver, plan.donor
        position = plan.position
        self.blocks = {name: i for i, name in enumerate(model.tree.blocks)}
        first_block = model.tree.modules[model.tree.blocks[0]] if self.blocks else None
        reuse_positions = strategy == GROW and called_with_cache(first_block)
        # Before the first position where the runs differ, donor and receiver activations agree,
        # so a patch there changes nothing.
        first_difference = plan.first_difference(pair)
        self.corruption = plan.corruption
        self.pair = pair
        self.start = {}  # site id -> first position its row computes
        for i, site in enumerate(sites):
            start = max(min(min(part.positions or (0,)) for part in site.parts), first_difference)
            self.start[i] = start if reuse_positions and 0 < start <= position else 0
        layer_of = {  # the block at whose input a site's row joins the batch
            GROW: lambda i: min(model.tree.block_of(part.module) for part in sites[i].parts),
            FLAT: lambda i: 0,
            WHOLE: lambda i: -1,
        }[strategy]
        order = sorted(range(len(sites)), key=lambda i: (self.start[i], layer_of(i)))
        self.members = defaultdict(list)  # start -> site ids, in batch order
        self.entering = defaultdict(list)  # (start, layer) -> site ids appended at that block
        for i in order:
            self.members[self.start[i]].append(i)
            self.entering[self.start[i], layer_of(i)].append(i)
        self.starts = sorted(s for s in self.members if s > 0)
        # Each site's row in its start's batch, and in the final logits (starts one after another).
        self.slot, self.index, total = {}, {}, 2
        for start in [0, *self.starts]:
            for slot, i in enumerate(self.members[start], start=2 if start == 0 else 0):
                self.slot[i], self.index[i] = slot, total
                total += 1
        self.patches = defaultdict(list)  # activation key -> (site id, the part patched there)
        for i, site in enumerate(sites):
            for part in site.parts:
                self.patches[part.key].append((i, part))
        # State of the running forward.
        self.next_block = 0
        self.applied: set[str] = set()
        self.donor_values: dict[str, mx.array] = {}  # key -> the donor row's activation
        self.active = 0  # the start whose rows the current call computes
        self.hidden: dict[int, mx.array] = {}  # start -> its rows' residual stream

    @property
    def grow(self) -> bool:
        """Whether rows join the batch at the blocks (GROW, FLAT), not all at the tokens (WHOLE)."""
        return self.strategy != WHOLE

    def block_calls(self) -> list[tuple[int, int]]:
        """(rows, positions) of every block call this forward makes, for the cost model."""
        length, layers = self.tokens.shape[1], len(self.blocks)
        if not self.grow:
            return [(2 + len(self.sites), length)] * layers
        calls = []
        for start in [0, *self.starts]:
            rows = 2 if start == 0 else 0
            for layer in range(layers):
                rows += len(self.entering.get((start, layer), ()))
                if rows:
                    calls.append((rows, length - start))
        return calls

    def run(self) -> mx.array:
        """Logits (rows, vocab) at the measured position: clean, corrupted, then `self.index`."""
        tokens = self.tokens
        if not self.grow:  # every row in the batch from the start
            tokens = mx.concatenate([tokens, mx.repeat(tokens[self.receiver:self.receiver + 1],
                                                       len(self.sites), axis=0)])
        names = set(self.patches) | (set(self.blocks) if self.grow else set())
        if self.corruption is not None:
            names.add(self.corruption.module)
        modules = sorted({key.removesuffix(":input") for key in names})
        with intercepted(self.model.tree, modules, self._call):
            logits = self.model.model(tokens)
        if self.grow and self.next_block != len(self.blocks):
            raise _BlocksOutOfOrder(f"only {self.next_block} of {len(self.blocks)} blocks ran")
        missing = set(self.patches) - self.applied
        if missing:
            raise NotReachedError(
                f"patch sites {sorted(missing)} were never reached in the forward pass: their "
                "modules were not called. Patch a module the model runs."
            )
        if not self.grow:
            logits = logits[:, self.position:self.position + 1]
        return logits[:, 0]

    def _call(self, name: str, module, args: tuple, kwargs: dict):
        if self.grow and name in self.blocks and self.active == 0:
            return self._block(self.blocks[name], name, module, args, kwargs)
        return self._module(name, module, args, kwargs)

    def _module(self, name: str, module, args: tuple, kwargs: dict):
        input_key = f"{name}:input"
        corrupts = self.corruption is not None and name == self.corruption.module

        def patch_output(y):  # the corruption makes the corrupted run; a patch acts on that run
            y = self._corrupt(y) if corrupts else y
            return self._patch(name, y) if name in self.patches else y

        return call_patched(
            module, args, kwargs,
            (lambda x: self._patch(input_key, x)) if input_key in self.patches else None,
            patch_output if corrupts or name in self.patches else None)

    def _corrupt(self, y: mx.array) -> mx.array:
        """`y` with the corrupted run's rows corrupted: its own row, and the patched rows that
        copy it when they are in the batch from the start (denoising without growing)."""
        end = y.shape[0] if self.receiver == CORRUPTED else CORRUPTED + 1
        return mx.concatenate([y[:CORRUPTED], self.corruption.apply(self.pair, y[CORRUPTED:end]), y[end:]])

    def _grown(self, hidden: mx.array | None, start: int, layer: int, source: mx.array):
        """`hidden` with the rows of `start` that enter at `layer` appended (receiver copies)."""
        entering = self.entering.get((start, layer))
        if not entering:
            return hidden
        new = mx.repeat(source[self.receiver:self.receiver + 1, start:], len(entering), axis=0)
        return new if hidden is None else mx.concatenate([hidden, new])

    def _block(self, layer: int, name: str, module, args: tuple, kwargs: dict):
        if layer != self.next_block:
            raise _BlocksOutOfOrder(f"{name} came out of turn")
        self.next_block += 1
        block_input = call_input(module, args, kwargs)
        args, kwargs = with_call_input(module, args, kwargs,
                                       self._grown(block_input, 0, layer, block_input))
        if not self.starts:
            out = self._module(name, module, args, kwargs)
        else:  # the signature is (x, mask, cache): checked in __init__
            call = inspect.signature(module).bind(*args, **kwargs).arguments
            x, mask = call[call_parameters(type(module))[0]], call.get("mask")
            recorder = _KVRecorder()
            out = self._module(name, module, (x,), {"mask": mask, "cache": recorder})
            for start in self.starts:
                hidden = self._grown(self.hidden.get(start), start, layer, block_input)
                if hidden is None:
                    continue
                keys, values = (mx.broadcast_to(kv[self.receiver:self.receiver + 1, :, :start],
                                                (hidden.shape[0], *kv.shape[1:2], start, kv.shape[3]))
                                for kv in (recorder.keys, recorder.values))
                prefix = _PrefixKV(keys, values, start)
                self.active = start
                self.hidden[start] = self._module(
                    name, module, (hidden,),
                    {"mask": _suffix_mask(mask, start, out.shape[1]), "cache": prefix})
                self.active = 0
        if layer == len(self.blocks) - 1:  # only the measured position goes on
            p = self.position
            out = mx.concatenate([out[:, p:p + 1]] + [self.hidden[s][:, p - s:p - s + 1]
                                                      for s in self.starts])
        return out

    def _patch(self, key: str, x: mx.array) -> mx.array:
        """Patch the rows of the active start at `key`, each from the donor's activation."""
        start = self.active
        if start == 0:
            if key in self.donor_values:
                raise SiteError(
                    f"{key!r} is called more than once per forward pass; patch sites must be "
                    "modules called once (patch the module that calls it instead)."
                )
            if x.ndim != 3:
                raise SiteError(
                    f"{key!r} has shape {tuple(x.shape)}; patch sites must be (batch, positions, "
                    "features) activations."
                )
            self.applied.add(key)
            self.donor_values[key] = x[self.donor:self.donor + 1]
        parts = [(i, part) for i, part in self.patches[key] if self.start[i] == start]
        if not parts:
            return x
        by_row: list[Site | None] = [None] * x.shape[0]
        for i, part in parts:
            by_row[self.slot[i]] = part
        return patch_rows(x, self.donor_values[key][:, start:], by_row, start)


def bytes_per_row(model, seq_len: int) -> int:
    """An upper estimate of the memory one row of a batched forward adds at the sweep's peak.

    Three terms, fitted to the peak memory measured on SmolLM2 at 6, 14, 128 and 512 tokens
    (`bench/bench_memory.py`; the estimate is 1.14-1.16x the measured per-row peak there):
    measuring the row (the metric and its four noise evaluations, over float32 logits: 16 x
    vocabulary x 4 bytes), the block's activations (tokens x the activation dtype's size x half
    the summed output widths of the block's matrices), and attention scores (tokens^2 x heads x
    2.5 x 4 bytes, materialized where attention is not fused, as on the CPU).

    Example:
        >>> bytes_per_row(model, 512) / 2**20   # SmolLM2-135M float32
        30.8
    """
    block = model.tree.modules[model.tree.blocks[0]] if model.tree.blocks else model.model
    modules = [module for _, module in block.named_modules()]
    widths = [m.weight.shape[0] for m in modules if isinstance(getattr(m, "weight", None), mx.array)
              and m.weight.ndim == 2]
    floats = [w.dtype.size for _, w in tree_flatten(block.parameters())
              if mx.issubdtype(w.dtype, mx.floating)]
    heads = max((m.n_heads for m in modules if isinstance(getattr(m, "n_heads", None), int)),
                default=max(widths, default=4096) // 64)
    measuring = 16 * model.vocab_size * 4
    activations = seq_len * max(floats, default=4) * sum(widths) // 2
    scores = seq_len * seq_len * heads * 10
    return measuring + activations + scores


def free_memory() -> int:
    """Bytes a sweep may still take: the device's memory (the machine's, on a CPU) minus what
    MLX holds now (the model's weights among it).

    Example:
        >>> free_memory() / 2**30
        21.7
    """
    total = mx.device_info().get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0, total - mx.get_active_memory())


def rows_per_forward(model, seq_len: int, memory_budget: int) -> int:
    """Patched rows one forward may hold beside the clean and corrupted rows: as many as
    `memory_budget`, and the free memory, allow by the estimate of `bytes_per_row`.

    Raises:
        InputError: not even one patched row fits; the message gives the numbers.

    Example:
        >>> rows_per_forward(model, 14, 2 << 30)
        240
    """
    row, free = bytes_per_row(model, seq_len), free_memory()
    usable = min(memory_budget, free)
    if usable < 3 * row:
        raise InputError(
            f"a sweep over {seq_len} tokens needs about {_size(3 * row)} for its smallest forward (the "
            f"clean, the corrupted and one patched row, {_size(row)} each), but memory_budget is "
            f"{_size(memory_budget)} and {_size(free)} is free. Give a larger memory_budget, shorter "
            "prompts, or a smaller model or dtype."
        )
    return usable // row - 2


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def run_engine(
    model,
    plan: Plan,
    max_batch: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
    strategy: str | None = None,
) -> SweepValues:
    """Metric values of clean, corrupted and every patched run, many patches per forward.

    Each forward holds one pair's clean and corrupted rows and at most `max_batch` patched rows
    (default: as many as an estimate of `memory_budget` bytes of activations allows). `strategy`
    lays the rows out as GROW or FLAT; by default the one the model's measured block costs
    predict to be faster on this device (`cheaper_strategy`). Both give the naive values.

    Example:
        >>> run_engine(model, plan, max_batch=8).recovery(plan.direction)
    """
    if strategy not in (None, GROW, FLAT):
        raise InputError(f"strategy={strategy!r}: give {GROW!r}, {FLAT!r} or None (chosen by cost).")
    sites = list(plan.sites)
    per_forward = max_batch or rows_per_forward(model, plan.clean.shape[1], memory_budget)
    # Chunks within one row of each other: at most two shapes (a GPU backend builds per shape).
    count = max(1, -(-len(sites) // per_forward))
    bounds = [len(sites) * k // count for k in range(count + 1)]
    chunks = [(pair, sites[start:end], start)
              for pair in range(plan.pairs) for start, end in zip(bounds, bounds[1:], strict=False)]
    if not model.tree.blocks:
        strategy = WHOLE
    planned = {candidate: [_BatchedForward(model, plan, pair, chunk, candidate) for pair, chunk, _ in chunks]
               for candidate in ((GROW, FLAT) if strategy is None else (strategy,))}
    strategy = strategy or cheaper_strategy(model, planned)
    forwards = planned[strategy]
    values = SweepValues.empty(plan.pairs, len(sites))
    for k, (pair, chunk, offset) in enumerate(_progress(chunks, progress)):
        forward, forwards[k] = forwards[k], None  # a chunk's activations go with its forward
        if strategy == WHOLE and forward.strategy != WHOLE:  # an earlier chunk fell back
            forward = _BatchedForward(model, plan, pair, chunk, WHOLE)
        try:
            logits = forward.run()
        except _BlocksOutOfOrder as err:
            warnings.warn(
                f"the model does not call its blocks once each in order ({err}), so the engine "
                "cannot reuse the rows below each patch; running every patched row through the "
                "whole model instead.", stacklevel=2)
            strategy = WHOLE
            forward = _BatchedForward(model, plan, pair, chunk, strategy)
            logits = forward.run()
        # One measure of every row: each evaluation is a synchronisation point on a GPU.
        rows = mx.array([0, 1, *(forward.index[i] for i in range(len(chunk)))])
        measured, noise = measure(plan.metric_of(pair), logits[rows], logits[plan.donor])
        if offset == 0:
            values.set_base(pair, measured[:2], noise[:2])
            values.check_baseline(plan, pair)
        columns = slice(offset, offset + len(chunk))
        values.patched[pair, columns], values.patched_noise[pair, columns] = measured[2:], noise[2:]
    return values


def cheaper_strategy(model, forwards: dict[str, list[_BatchedForward]]) -> str:
    """The strategy whose forwards the model's measured block costs (`costs.py`) predict to be
    fastest; GROW where the blocks cannot be timed alone.

    Example:
        >>> cheaper_strategy(model, {s: [_BatchedForward(model, plan, 0, sites, s)] for s in (GROW, FLAT)})
        'grow'
    """
    costs = block_costs(model)
    if costs is None:
        return GROW
    calls = {strategy: [call for forward in chunks for call in forward.block_calls()]
             for strategy, chunks in forwards.items()}
    cheaper = min(calls, key=lambda strategy: costs.predict(calls[strategy]))
    costs.record(calls[cheaper])  # built by the sweep about to run
    return cheaper


def _progress(chunks: list, enabled: bool | None):
    if enabled is None:
        enabled = len(chunks) > 1 and sys.stderr.isatty()
    if not enabled:
        return chunks
    from tqdm.auto import tqdm

    return tqdm(chunks, desc="patching", unit="forward", total=len(chunks))
