"""Fault injection: each module of SmolLM2 in turn raises during a trace, an engine sweep and the
naive sweep. The injected exception must propagate (not swallowed, not replaced by another), the
model must be left exactly as it was, and the next run must give the same logits as before.

Faults are injected from here, not through mlxterp: conftest.hooked_calls patches `__call__` on
the modules' classes, and the hook raises when the target module is called.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_model_untouched, hooked_calls, parameters_snapshot
from mlx.utils import tree_flatten

from mlxterp import InterpretableModel

CLEAN, CORRUPTED = "Paris is the capital of France", "London is the capital of France"  # 6 tokens each
SWEEP_LAYERS = [0, 15, 29]
MODES = ("trace", "engine", "naive")
ONE_BLOCK = 15  # the default run's block: one of the swept layers, so its mlp is also patched


class InjectedFault(Exception):
    """Raised by the test inside a module's call; nothing in mlxterp knows this type."""


def run(model: InterpretableModel, mode: str) -> None:
    if mode == "trace":
        with model.trace(CLEAN) as trace:
            mx.eval(trace.output)
    else:
        model.patching_sweep(CLEAN, CORRUPTED, component="mlp", layers=SWEEP_LAYERS, metric="kl",
                             naive=mode == "naive")


class Faults:
    """SmolLM2 wrapped, its logits before any fault, and how often each mode calls each module."""

    def __init__(self, base, tokenizer):
        self.model = InterpretableModel(base, tokenizer=tokenizer)
        self.tokens = mx.array([tokenizer.encode(CLEAN)])
        self.logits = base(self.tokens)
        mx.eval(self.logits)
        self.weights = {k: np.array(v).tobytes() for k, v in tree_flatten(base.parameters())}
        self.calls = {}
        for mode in MODES:
            counts: dict[str, int] = {}

            def count(name, call, args, kwargs, counts=counts):
                counts[name] = counts.get(name, 0) + 1
                return call(*args, **kwargs)

            with hooked_calls(base, count):
                run(self.model, mode)
            self.calls[mode] = counts

    def modules(self, scope: str) -> list[str]:
        names = self.model.module_names()
        if scope == "every module":
            return names
        block = self.model.tree.blocks[ONE_BLOCK]
        outside = [n for n in names if not n.startswith(self.model.tree.blocks_name + ".")]
        return outside + [n for n in names if n == block or n.startswith(block + ".")]


@pytest.fixture(scope="module")
def faults(smollm2) -> Faults:
    return Faults(*smollm2)


def inject(faults: Faults, target: str, mode: str) -> None:
    """Make `target` raise on its last call in `mode` (the deepest point of the run: every earlier
    forward, probe and patch has happened), and check what follows."""
    model, base = faults.model, faults.model.model
    last = faults.calls[mode].get(target, 0)
    assert last > 0, f"{target} is never called in a {mode}; nothing to inject into"
    raised: list[InjectedFault] = []
    seen = 0

    def hook(name, call, args, kwargs):
        nonlocal seen
        if name == target:
            seen += 1
            if seen == last:
                raised.append(InjectedFault(f"injected into {target}, call {seen}, during a {mode}"))
                raise raised[-1]
        return call(*args, **kwargs)

    before = parameters_snapshot(base)
    with hooked_calls(base, hook), pytest.raises(InjectedFault) as caught:
        run(model, mode)
    # The very exception raised in the module reached the caller, and only once.
    assert len(raised) == 1 and caught.value is raised[0], (target, mode, caught.value)
    assert_model_untouched(base, before)
    # The next run is correct: a trace of the same single row (the same batch layout as the
    # reference, so bit-equal in practice); 1e-5 of max |logit| is ~10x the float32 noise
    # floor of SmolLM2's logits across batch layouts (metrics.LOGIT_NOISE is 2e-6).
    with model.trace(faults.tokens) as trace:
        logits = trace.output
    scale = mx.max(mx.abs(faults.logits)).item()
    np.testing.assert_allclose(np.array(logits), np.array(faults.logits), rtol=0, atol=1e-5 * scale,
                               err_msg=f"after a fault in {target} during a {mode}")


@pytest.mark.parametrize("scope", ["one block", pytest.param("every module", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["trace", "engine", pytest.param("naive", marks=pytest.mark.slow)])
def test_a_fault_in_any_module_propagates_and_leaves_the_model_intact(faults, mode, scope):
    """Every module (scope "every module": all 394, `-m slow`) or every module type of one block
    plus the modules outside the blocks (the default run), made to fail in `mode`."""
    targets = faults.modules(scope)
    started = time.perf_counter()
    for target in targets:
        inject(faults, target, mode)
    elapsed = time.perf_counter() - started
    print(f"\n{mode}, {scope}: {len(targets)} injections in {elapsed:.1f} s")
    # Bytes, not only identities: no fault left a parameter written in place.
    assert {k: np.array(v).tobytes() for k, v in tree_flatten(faults.model.model.parameters())} \
        == faults.weights
