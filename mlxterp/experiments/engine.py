"""The one engine that runs patch sites, and the naive procedure it must agree with.

Both return the metric of every run: clean, corrupted, and one patched run per site and pair.

The engine runs many patches in one forward pass. The batch starts as the clean and corrupted
prompts; when the forward reaches block l, it appends one copy of the receiving row (the
corrupted one, when denoising) for every site patched in block l, and the patch of each copied
row takes the donor's value from the donor's own row of the same batch, so no activation cache
is needed. Blocks below l are computed once for all the sites of block l and above, instead of
once per site. After the last block only the measured position goes on to the unembedding.
This relies on the model calling its block list once each, in order, with the residual stream
as the first argument, and on nothing after the blocks mixing positions: true of every mlx-lm
model. Where the blocks are not called in order, the engine falls back to putting every row in
the batch from the start, and warns.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxterp.errors import MlxterpError
from mlxterp.experiments.metrics import Metric, evaluate
from mlxterp.experiments.sites import PatchSite
from mlxterp.tracing.intercept import intercepted

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of activations one forward may hold


class PatchNotAppliedError(MlxterpError, RuntimeError):
    """A patch site whose module never ran: patching it would silently measure nothing."""


@dataclass
class SweepValues:
    """Metric values of every run of a sweep, for `pairs` prompt pairs and `sites` sites."""

    clean: np.ndarray  # (pairs,)
    corrupted: np.ndarray  # (pairs,)
    patched: np.ndarray  # (pairs, sites)


@dataclass(frozen=True)
class _Row:
    """A patched row of the batch: its site, the base row it copies, the base row it takes from."""

    site: PatchSite
    pair: int
    receiver: int
    donor: int


def _rows(sites: Sequence[PatchSite], pairs: int, direction: str) -> list[_Row]:
    """Patched rows, pair-major. Base rows are clean 0..pairs-1, then corrupted."""
    rows = []
    for pair in range(pairs):
        clean, corrupted = pair, pairs + pair
        receiver, donor = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
        rows += [_Row(site, pair, receiver, donor) for site in sites]
    return rows


class _BlocksOutOfOrder(Exception):
    """Raised inside a forward when the model does not call its blocks once each, in order."""


class _KVRecorder:
    """mlx-lm's attention-cache protocol for the main batch: keeps keys and values, changes nothing."""

    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


class _PrefixKV:
    """The attention-cache protocol for rows that compute only positions start..T-1: keys and
    values of the earlier positions are the receiving run's, and rotary offsets start at start."""

    def __init__(self, keys: mx.array, values: mx.array, start: int):
        self.keys, self.values, self.offset = keys, values, start

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return (mx.concatenate([self.keys, keys], axis=2),
                mx.concatenate([self.values, values], axis=2))


def _takes_cache(block) -> bool:
    return "cache" in inspect.signature(type(block).__call__).parameters


class _BatchedForward:
    """One forward pass of base rows plus patched rows; see the module docstring.

    Rows live in groups by the first position they compute: group 0 is the model's own batch
    (base rows first); a row that cannot differ from its receiver before position p > 0 joins
    group p, which the engine runs through each block beside group 0 on positions p..T-1 only.
    """

    def __init__(self, model, tokens: mx.array, rows: list[_Row], position: int, grow: bool):
        self.model, self.rows, self.position, self.grow = model, rows, position, grow
        self.base = tokens.shape[0]
        self.blocks = {name: i for i, name in enumerate(model._tree.blocks)}
        self.next_block = 0
        suffixes = grow and _takes_cache(model._tree.modules[model._tree.blocks[0]])
        # A patched row equals its receiver before the first position where the patch can change
        # anything: its first patched position, and no earlier than the first token where the
        # pair's prompts differ (before it, donor and receiver activations are the same).
        pairs = self.base // 2
        differ = (tokens[:pairs] != tokens[pairs:]).tolist()
        first_difference = [row.index(True) if True in row else len(row) for row in differ]
        self.group = {}  # row id -> first position it computes
        for row_id, row in enumerate(rows):
            start = max(min(row.site.positions or (0,)), first_difference[row.pair])
            self.group[row_id] = start if suffixes and 0 < start <= position else 0
        order = sorted(range(len(rows)), key=lambda i: (self.group[i], rows[i].site.layer if grow else 0))
        self.members = defaultdict(list)  # group -> its patched row ids, in batch order
        self.entering = defaultdict(list)  # (group, layer) -> row ids appended at that block's input
        for row_id in order:
            group = self.group[row_id]
            self.members[group].append(row_id)
            self.entering[group, rows[row_id].site.layer if grow else -1].append(row_id)
        self.groups = sorted(g for g in self.members if g > 0)
        # Index of each row in its group's batch (group 0 starts with the base rows), and in the
        # final logits, where the groups follow one another.
        self.slot, self.index, total = {}, {}, self.base
        for group in [0, *self.groups]:
            for slot, row_id in enumerate(self.members[group], start=self.base if group == 0 else 0):
                self.slot[row_id], self.index[row_id] = slot, total
                total += 1
        self.patches = defaultdict(list)  # activation key -> row ids patched there
        for row_id, row in enumerate(rows):
            self.patches[row.site.key].append(row_id)
        self.applied: set[str] = set()
        self.donor_values: dict[str, mx.array] = {}  # key -> base rows' activation, this forward
        self.active = 0  # the group whose rows the current call computes
        self.hidden: dict[int, mx.array] = {}  # group -> its rows' residual stream
        if not grow:  # every row in the batch from the start
            receivers = [rows[i].receiver for i in self.entering[0, -1]]
            tokens = mx.concatenate([tokens, tokens[mx.array(receivers, dtype=mx.int32)]]) \
                if receivers else tokens
        self.tokens = tokens

    def run(self) -> mx.array:
        """Logits (rows, vocab) at the measured position, in the order of `self.index`."""
        names = set(self.patches) | (set(self.blocks) if self.grow else set())
        modules = sorted({key.removesuffix(":input") for key in names})
        with intercepted(self.model._tree, modules, self._call):
            logits = self.model.model(self.tokens)
        missing = set(self.patches) - self.applied
        if missing:
            raise PatchNotAppliedError(
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
        if input_key in self.patches:
            args = (self._patch(input_key, args[0]), *args[1:])
        out = module(*args, **kwargs)
        if name in self.patches:
            out = self._patch(name, out)
        return out

    def _grown(self, x: mx.array, group: int, layer: int, source: mx.array) -> mx.array:
        """`x` with the rows of `group` that enter at `layer` appended (copies of receivers)."""
        entering = self.entering.get((group, layer))
        if not entering:
            return x
        receivers = mx.array([self.rows[i].receiver for i in entering], dtype=mx.int32)
        new = source[receivers][:, group:]
        return new if x is None else mx.concatenate([x, new])

    def _block(self, layer: int, name: str, module, args: tuple, kwargs: dict):
        if layer != self.next_block:
            raise _BlocksOutOfOrder(name)
        self.next_block += 1
        block_input = args[0]
        args = (self._grown(block_input, 0, layer, block_input), *args[1:])
        recorder = None
        if self.groups:
            recorder = _KVRecorder()
            kwargs = {**kwargs, "cache": recorder}
            args = args[:2]  # the cache goes by keyword
        out = self._module(name, module, args, kwargs)
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        for group in self.groups:
            hidden = self._grown(self.hidden.get(group), group, layer, block_input)
            if hidden is None:
                continue
            receivers = mx.array([self.rows[i].receiver
                                  for i in self.members[group][: hidden.shape[0]]], dtype=mx.int32)
            prefix = _PrefixKV(recorder.keys[receivers, :, :group],
                               recorder.values[receivers, :, :group], group)
            self.active = group
            self.hidden[group] = self._module(name, module, (hidden, _suffix_mask(mask, group, out.shape[1])),
                                              {"cache": prefix})
            self.active = 0
        if layer == len(self.blocks) - 1:  # only the measured position goes on
            pieces = [out[:, self.position:self.position + 1]]
            pieces += [self.hidden[g][:, self.position - g:self.position - g + 1] for g in self.groups]
            out = mx.concatenate(pieces)
        return out

    def _patch(self, key: str, x: mx.array) -> mx.array:
        """Patch the rows of the active group at `key`, each from its donor's activation."""
        self.applied.add(key)
        group = self.active
        if group == 0:
            self.donor_values[key] = x[: self.base]
            source = x
        else:
            source = self.donor_values[key][:, group:]
        rows = [i for i in self.patches[key] if self.group[i] == group]
        if not rows:
            return x
        mask = np.zeros(x.shape, dtype=bool)
        donors = np.arange(x.shape[0]) if group == 0 else np.zeros(x.shape[0], dtype=np.int64)
        full_shape = (*x.shape[:-2], x.shape[-2] + group, x.shape[-1])
        for row_id in rows:
            row = self.rows[row_id]
            mask[self.slot[row_id]] = row.site.mask(full_shape)[group:]
            donors[self.slot[row_id]] = row.donor
        return mx.where(mx.array(mask), source[mx.array(donors)], x)


def _suffix_mask(mask, start: int, length: int):
    """The attention mask of queries start..length-1 over keys 0..length-1."""
    if isinstance(mask, mx.array):
        return mask[..., start:, :]
    if mask is None or mask == "causal":
        return mx.arange(start, length)[:, None] >= mx.arange(length)[None]
    raise MlxterpError(f"unexpected attention mask {mask!r}")


def _bytes_per_row(model, seq_len: int) -> int:
    """A rough upper bound of the activations one row of one forward holds at once (float32)."""
    widths = [m.weight.shape[0] for name, m in model._tree.modules.items()
              if name.startswith(model._tree.blocks[0] + ".") and hasattr(m, "weight")
              and m.weight.ndim == 2]
    return 4 * seq_len * (8 * max(widths, default=4096) + 16 * sum(widths) // max(len(widths), 1))


def run_engine(
    model,
    clean: mx.array,
    corrupted: mx.array,
    sites: Sequence[PatchSite],
    metric: Metric,
    position: int,
    direction: str = "denoise",
    max_batch: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
) -> SweepValues:
    """Metric values of clean, corrupted and every patched run, many patches per forward.

    `clean` and `corrupted` are (pairs, seq) token arrays. Rows per forward are limited by
    `max_batch`, or else by `memory_budget` bytes.
    """
    pairs, seq_len = clean.shape
    tokens = mx.concatenate([clean, corrupted])
    rows = _rows(sites, pairs, direction)
    per_forward = max_batch or max(1, memory_budget // _bytes_per_row(model, seq_len) - 2 * pairs)
    chunks = [range(i, min(i + per_forward, len(rows))) for i in range(0, len(rows), per_forward)]
    grow = len(model._tree.blocks) > 0
    base = np.zeros((pairs, 2))
    patched = np.zeros(len(rows))
    for chunk in _progress(chunks, progress):
        chunk_rows = [rows[i] for i in chunk]
        try:
            forward = _BatchedForward(model, tokens, chunk_rows, position, grow)
            logits = forward.run()
        except _BlocksOutOfOrder as err:
            warnings.warn(
                f"the model does not call its blocks once each in order ({err} came out of "
                "turn), so the engine cannot reuse the rows below each patch; running every "
                "patched row through the whole model instead.", stacklevel=2)
            grow = False
            forward = _BatchedForward(model, tokens, chunk_rows, position, grow)
            logits = forward.run()
        # Per pair: its clean row, its corrupted row, then its patched rows (chunk order).
        members = [[i for i, row in enumerate(chunk_rows) if row.pair == pair] for pair in range(pairs)]
        values = [
            evaluate(metric, logits[mx.array([pair, pairs + pair] + [forward.index[i] for i in ids])],
                     logits[pair])
            for pair, ids in enumerate(members)
        ]
        mx.eval(values)
        for pair, (ids, pair_values) in enumerate(zip(members, values, strict=True)):
            numbers = np.array(pair_values, dtype=np.float64)
            base[pair] = numbers[:2]
            patched[[chunk[i] for i in ids]] = numbers[2:]
    return SweepValues(base[:, 0], base[:, 1], patched.reshape(pairs, len(sites)))


def run_naive(
    model,
    clean: mx.array,
    corrupted: mx.array,
    sites: Sequence[PatchSite],
    metric: Metric,
    position: int,
    direction: str = "denoise",
) -> SweepValues:
    """The reference: one clean and one corrupted forward, then one patched forward per site,
    each with every activation captured."""
    pairs = clean.shape[0]
    values = SweepValues(np.zeros(pairs), np.zeros(pairs), np.zeros((pairs, len(sites))))
    for pair in range(pairs):
        with model.trace(clean[pair:pair + 1]) as trace:
            clean_acts = [trace.activations[site.key] for site in sites]
            clean_logits = trace.output[0, position]
        with model.trace(corrupted[pair:pair + 1]) as trace:
            corrupted_acts = [trace.activations[site.key] for site in sites]
            corrupted_logits = trace.output[0, position]
        donors, receiver = (clean_acts, corrupted) if direction == "denoise" else (
            corrupted_acts, clean)
        base = evaluate(metric, mx.stack([clean_logits, corrupted_logits]), clean_logits)
        values.clean[pair], values.corrupted[pair] = np.array(base, dtype=np.float64)
        for i, (site, donor) in enumerate(zip(sites, donors, strict=True)):
            with model.trace(receiver[pair:pair + 1],
                             interventions={site.key: lambda x, s=site, d=donor: s.patch(x, d)}
                             ) as trace:
                logits = trace.output[0, position]
            values.patched[pair, i] = evaluate(metric, logits[None], clean_logits).item()
    return values


def _progress(chunks: list, enabled: bool | None):
    if enabled is None:
        enabled = len(chunks) > 1 and sys.stderr.isatty()
    if not enabled:
        return chunks
    from tqdm.auto import tqdm

    return tqdm(chunks, desc="patching", unit="forward", total=len(chunks))

