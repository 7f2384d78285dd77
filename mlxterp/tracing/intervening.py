"""Interventions installed for any calls of the model, with token positions counted across calls.

A trace runs one forward pass. Generation runs many: mlx-lm's loop feeds the prompt, then one
token per call, with a KV cache. `Intervening` installs the same checked `Interventions` through
the same probes (`intercepted` + `call_patched`) for every call made inside its `with` block, and
counts the tokens each forward pass brings, so that a position-aware intervention is told the
*absolute* position of the activation's first token: position 3 is the fourth token of the
whole sequence, whichever call processes it.

The count is taken at the module that runs the blocks (`model.model` in mlx-lm models): it is
called once per forward pass, with the new token ids, before any block runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import ExitStack

import mlx.core as mx
import mlx.nn as nn

from mlxterp.errors import InstalledInterventionError, MlxterpError
from mlxterp.tracing.intercept import call_input, call_patched, intercepted
from mlxterp.tracing.names import ROOT, ModuleTree
from mlxterp.tracing.trace import Intervention, Interventions


class Intervening:
    """Interventions applied to every call of the model made inside `with`; re-enterable.

    Made by `InterpretableModel.intervening`. Each `with` installs the probes and removes them
    on exit, whatever happened inside; the token count goes on across blocks, so a caller can
    install the interventions around each step of a loop and leave the model clean between.

    Example:
        >>> steering = model.intervening({"layers.6": iv.add_vector(1.0 * v)})
        >>> with steering:
        ...     logits = model("I went to the")       # positions 0-3
        >>> steering.tokens_seen
        4
    """

    def __init__(
        self,
        tree: ModuleTree,
        interventions: Mapping[str, Intervention] | None,
        on_enter: Callable[[Intervening], None] = lambda intervening: None,
        on_exit: Callable[[], None] = lambda: None,
    ):
        if tree.blocks_name is None or tree.blocks_name.rpartition(".")[0] == ROOT:
            raise MlxterpError(
                "installing interventions needs the model's blocks inside a sub-module (as in "
                "mlx-lm models, `model.model.layers`): its calls mark where each forward pass "
                "starts."
            )
        self._tree = tree
        self._on_enter, self._on_exit = on_enter, on_exit
        self._body = tree.blocks_name.rpartition(".")[0]  # called once per forward pass
        self.interventions = Interventions(tree, interventions)
        self.tokens_seen = 0  # tokens of every forward pass so far: the next one starts here
        self._start = 0  # the first position of the current forward pass
        self._calls: Counter[str] = Counter()  # calls of each module in the current forward pass
        self._probes: ExitStack | None = None  # while installed: removes the probes on exit

    def __enter__(self) -> Intervening:
        if self._probes is not None:
            raise MlxterpError("these interventions are already installed; leave the outer `with` first.")
        self._on_enter(self)
        names = sorted(self.interventions.modules | {self._body})
        self._probes = ExitStack()
        try:
            self._probes.enter_context(intercepted(self._tree, names, self._handle_call))
        except BaseException:
            self._probes = None
            self._on_exit()
            raise
        return self

    def __exit__(self, *exc) -> None:
        probes, self._probes = self._probes, None
        try:
            probes.__exit__(*exc)
        finally:
            self._on_exit()
        if exc[0] is None and self.tokens_seen:
            self.interventions.check_ran(self._calls, "the last forward pass")

    def _handle_call(self, name: str, module: nn.Module, args: tuple, kwargs: dict):
        if name == self._body:
            self._begin_forward(call_input(module, args, kwargs))
        call = self._calls[name]
        self._calls[name] += 1
        plans = self.interventions.at_call(name, call)
        if not plans:
            return module(*args, **kwargs)

        def patch(x, is_input: bool):
            # Read when the activation arrives: a module that encloses the blocks' owner is
            # called before that owner starts the forward pass and counts its tokens.
            start, length = self._start, self.tokens_seen - self._start
            try:
                return self.interventions.apply(plans, x, is_input, start)
            except (MlxterpError, ValueError) as err:  # add which call it was; the cause stays chained
                raise InstalledInterventionError(
                    f"an intervention on {name!r} failed on the forward pass over positions "
                    f"{start} to {start + length - 1} ({length} token{'s' * (length != 1)}): {err}\n"
                    "Generation runs the prompt, then one token per forward pass: if the "
                    "intervention's value has one row per prompt token (e.g. iv.replace_with of a "
                    "whole prompt's activation), give one that broadcasts over positions (shape "
                    "(d,)), or one position's value inside iv.at_positions(p, ...), p counting from "
                    "the prompt's first token."
                ) from err

        return call_patched(module, args, kwargs, lambda x: patch(x, True), lambda y: patch(y, False))

    def _begin_forward(self, tokens) -> None:
        if not isinstance(tokens, mx.array) or tokens.ndim != 2:
            raise MlxterpError(
                f"{self._body!r} was called with {type(tokens).__name__} "
                f"{getattr(tokens, 'shape', '')}; installed interventions count positions from "
                "token ids of shape (batch, tokens)."
            )
        self._start = self.tokens_seen
        self.tokens_seen += tokens.shape[1]
        self._calls.clear()
