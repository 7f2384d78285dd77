"""Activations streamed from a model, for training on them: never all in memory, and the same
batches for the same seed, whichever step a run starts from.

The token windows are dealt in rounds: round r runs the model over `round_windows` windows
(the windows' order a permutation of all of them, one per pass over the data, seeded), keeps
the activations at the sites from position `skip` on, and shuffles those tokens (seeded by r).
Batch b of the stream is slice b mod n of round b div n. A run resumed at step s recomputes
its round and finds exactly the batches a run that never stopped would have seen.

The forward stops at the last site it needs: training an SAE on block 8 of 30 runs 9 blocks.

Example:
    >>> stream = ActivationStream(model, ["layers.8"], windows, batch_tokens=4096, seed=0)
    >>> (x,) = stream.batch(0)        # (4096, 576) float32
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputError, NotReachedError, SiteError
from mlxterp.tracing.intercept import call_input, intercepted
from mlxterp.tracing.names import Site


class _Collected(Exception):
    """Raised inside the forward once every site has been read: the rest need not run."""


def collect(model, tokens: mx.array, sites: list[Site]) -> list[mx.array]:
    """The activations at `sites` (output or input of their module's first call) for a batch
    of token ids, from a forward that stops once the last of them is computed.

    Raises:
        NotReachedError: a site whose module the forward never called.

    Example:
        >>> (resid,) = collect(model, windows[:8], [model.tree.site("layers.8")])
    """
    found: dict[str, mx.array] = {}

    def read(name, module, args, kwargs):
        for site in sites:
            if site.module == name and site.is_input and site.key not in found:
                found[site.key] = call_input(module, args, kwargs)
        output = module(*args, **kwargs)
        for site in sites:
            if site.module == name and not site.is_input and site.key not in found:
                found[site.key] = output
        if len(found) == len(sites):
            raise _Collected
        return output

    try:
        with intercepted(model.tree, {site.module for site in sites}, read):
            model.model(tokens)
    except _Collected:
        return [found[site.key] for site in sites]
    missing = [site.key for site in sites if site.key not in found]
    raise NotReachedError(f"the model never called {missing}: nothing to read there.")


class ActivationStream:
    """Shuffled batches of activations at one or more sites (see the module docstring).

    Example:
        >>> stream = ActivationStream(model, ["layers.8.mlp:input", "layers.8.mlp"], windows)
        >>> x, y = stream.batch(12)
    """

    def __init__(
        self,
        model,
        sites: list[str],
        windows: mx.array,
        batch_tokens: int = 4096,
        round_windows: int = 256,
        forward_windows: int = 32,
        skip: int = 1,
        seed: int = 0,
    ):
        self.model, self.windows, self.seed, self.skip = model, np.asarray(windows), seed, skip
        self.sites = [model.tree.site(key) for key in sites]
        if any(site.call is not None for site in self.sites):
            raise SiteError(f"{sites}: a stream reads a module's first call; drop the #k.")
        n_windows, length = self.windows.shape
        if length <= skip:
            raise InputError(f"windows of {length} tokens keep nothing after skipping the first {skip}.")
        self.round_windows = min(round_windows, n_windows)
        self.forward_windows, self.batch_tokens = forward_windows, batch_tokens
        self.batches_per_round = self.round_windows * (length - skip) // batch_tokens
        if self.batches_per_round == 0:
            raise InputError(
                f"a round of {self.round_windows} windows holds fewer than batch_tokens="
                f"{batch_tokens} tokens; give more text or a smaller batch."
            )
        self.rounds_per_pass = n_windows // self.round_windows
        self._round: tuple[int, list[mx.array]] | None = None

    @property
    def widths(self) -> list[int]:
        """The width of each site's activations."""
        return [a.shape[-1] for a in self._activations(0)]

    def batch(self, step: int) -> list[mx.array]:
        """Batch `step` of the stream: one (batch_tokens, width) float32 array per site."""
        number, offset = divmod(step, self.batches_per_round)
        rows = slice(offset * self.batch_tokens, (offset + 1) * self.batch_tokens)
        return [a[rows] for a in self._activations(number)]

    def _activations(self, number: int) -> list[mx.array]:
        if self._round is None or self._round[0] != number:
            self._round = (number, self._compute_round(number))
        return self._round[1]

    def _compute_round(self, number: int) -> list[mx.array]:
        epoch, index = divmod(number, self.rounds_per_pass)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
        chosen = self.windows[order[index * self.round_windows : (index + 1) * self.round_windows]]
        parts: list[list[mx.array]] = [[] for _ in self.sites]
        for start in range(0, len(chosen), self.forward_windows):
            found = collect(self.model, mx.array(chosen[start : start + self.forward_windows]), self.sites)
            for part, activation in zip(parts, found, strict=True):
                part.append(activation[:, self.skip :].astype(mx.float32).reshape(-1, activation.shape[-1]))
            mx.eval(parts)
        shuffle = mx.array(
            np.random.default_rng([self.seed, epoch, index, 1]).permutation(sum(p.shape[0] for p in parts[0]))
        )
        return [mx.concatenate(part)[shuffle] for part in parts]
