"""Attribution patching on SmolLM2 (float32): its cost as multiples of one plain forward of the
bare model measured in the same run, and its peak memory as a multiple of one forward with every
site captured.

    .venv/bin/python bench/bench_attribution.py

The sweep: the block input, mlp and self_attn outputs of every layer at every position of the
14-token IOI pair (3 x 30 x 14 = 1,260 sites) in one AtP call; beside it the exact engine on one
of those components (420 sites), and integrated gradients at 4 and 16 steps (cost per step).
A plain forward and backward of the model is timed too: with the donor's forward, AtP's floor.
"""

from __future__ import annotations

import mlx.core as mx
from timing import timed

import mlxterp
from mlxterp import InterpretableModel
from mlxterp.blas import blas_status
from mlxterp.tracing import Site

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When John and Mary went to the store, Mary gave a drink to"
COMPONENTS = ("input", "mlp", "self_attn")


def main() -> None:
    base, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base, tokenizer)
    ids = mx.array([tokenizer.encode(CLEAN)])
    length = ids.shape[1]
    blocks = model.tree.blocks
    sites = [Site(f"{block}.{component}" if component != "input" else block, is_input=component == "input",
                  positions=(position,))
             for block in blocks for component in COMPONENTS for position in range(length)]
    keys = sorted({site.key for site in sites})

    def forward():
        mx.eval(base(ids))

    def captured():
        with model.trace(ids, capture=keys) as trace:
            mx.eval([trace.activations[key] for key in keys])

    def forward_and_backward():  # AtP's least cost is this plus the donor's forward
        embedded = base.model.embed_tokens(ids)

        def last_logsumexp(hidden):
            for block in base.model.layers:
                hidden = block(hidden, mask="causal", cache=None)
            return mx.logsumexp(base.model.embed_tokens.as_linear(base.model.norm(hidden))[0, -1])

        mx.eval(mx.value_and_grad(last_logsumexp)(embedded))

    def atp():
        model.attribution_patching(CLEAN, CORRUPTED, sites=sites, metric="kl")

    def exact():
        model.patching_sweep(CLEAN, CORRUPTED, component="input", over=("layer", "position"),
                             metric="kl", progress=False)

    def ig(steps: int):
        return lambda: model.attribution_patching(CLEAN, CORRUPTED, sites=sites, metric="kl",
                                                  method="ig", steps=steps)

    forward()
    one, forward_peak = timed(forward, repeats=10)
    _, captured_peak = timed(captured)
    print(f"SmolLM2-135M float32, BLAS: {blas_status().kind}; {length}-token IOI pair, "
          f"{len(sites)} sites; one plain forward {one * 1000:.0f} ms, peak {forward_peak:.2f} GiB; "
          f"with every site captured peak {captured_peak:.2f} GiB")
    rows = [("plain forward and backward", forward_and_backward),
            ("AtP, 1,260 sites (3 components)", atp), ("exact engine, 420 sites (input)", exact),
            ("IG 4 steps, 1,260 sites", ig(4)), ("IG 16 steps, 1,260 sites", ig(16))]
    results = {}
    for name, fn in rows:
        seconds, peak = timed(fn)
        results[name] = seconds
        print(f"{name:<34} {seconds / one:7.2f}x forward   peak {peak:.2f} GiB "
              f"({peak / captured_peak:.2f}x the captured forward)")
    per_step = (results["IG 16 steps, 1,260 sites"] - results["IG 4 steps, 1,260 sites"]) / 12
    print(f"IG: {per_step / one:.2f}x forward per step")


if __name__ == "__main__":
    main()
