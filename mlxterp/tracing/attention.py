"""Attention probabilities, rebuilt from what the model's attention module computes.

mlx-lm's attention calls `mx.fast.scaled_dot_product_attention`, which never materialises the
probabilities. A trace that asks for them intercepts three things the module already does, with
the one interception mechanism: its rotary embedding's two calls (queries, then keys: after any
q/k norm and RoPE, so Qwen 3's and Gemma 3's norms are included), and the mask the block passes
in (`"causal"`, or Gemma 3's sliding-window array). The probabilities are then

    softmax(scale * q @ k^T + mask)    with each key head repeated for its query heads (GQA),

with the module's own `scale` (Gemma 3: `query_pre_attn_scalar ** -0.5`). The forward pass is
not changed: the trace only reads these arrays, so its output stays the untraced one.

Each pattern is checked against the model's own result in the same trace: pattern @ V (from
`v_proj`) must equal the attention output (the input of `o_proj`). A family whose attention is
not this formula is refused, not given wrong probabilities.

Example:
    >>> with model.trace(prompt, capture_attention=True) as trace:
    ...     pattern = trace.activations["layers.3.self_attn:pattern"]   # (batch, heads, q, k)
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxterp.errors import AttentionCaptureError
from mlxterp.tracing.intercept import call_parameters
from mlxterp.tracing.names import PATTERN, ModuleTree

# What an attention module must have for its probabilities to be rebuilt: mlx-lm's layout.
CHILDREN = ("rope", "v_proj", "o_proj")
ATTRIBUTES = ("scale", "n_heads", "n_kv_heads")
# |pattern @ V - attention output| / max(1, |output|) above which the rebuilt probabilities are
# not the model's: 0 on the CPU in float32, where MLX's attention computes the same products; a
# fused GPU kernel rounds differently, by far less than 1e-4. In bfloat16 or float16 the model's
# own attention rounds q, k and V: measured 0.014 on SmolLM2 in bfloat16, so the bound there is
# 16 machine epsilons of the dtype (0.0625 for bfloat16). A formula that differs is off by more:
# mlxterp also refuses soft-capped scores by the module's own setting (`attn_logit_softcapping`),
# since a mild cap hides inside half-precision rounding.
MIXING_TOLERANCE = 1e-4


def mixing_tolerance(dtype: mx.Dtype) -> float:
    """The bound on `AttentionLayout.mixing_error` for a model computing in `dtype`."""
    return max(MIXING_TOLERANCE, 16 * mx.finfo(dtype).eps)


@dataclass(frozen=True)
class AttentionLayout:
    """Where one block's attention lives and how it scales its scores.

    Example:
        >>> attention_layouts(model.tree)[3]
        AttentionLayout(module='model.model.layers.3.self_attn', scale=0.125, n_heads=9, n_kv_heads=3)
    """

    module: str  # the attention module's full name
    scale: float
    n_heads: int
    n_kv_heads: int

    @property
    def key(self) -> str:
        return self.module + PATTERN

    @property
    def rope(self) -> str:
        """Its rotary embedding: call 0 rotates the queries, call 1 the keys."""
        return f"{self.module}.rope"

    @property
    def values(self) -> str:
        return f"{self.module}.v_proj"

    @property
    def output(self) -> str:
        """Its output projection, whose input is the attention's output."""
        return f"{self.module}.o_proj"

    @property
    def mixed(self) -> str:
        """The key of the attention output before the output projection."""
        return f"{self.output}:input"

    def mixing_error(self, pattern: mx.array, values: mx.array, mixed: mx.array) -> mx.array:
        """max |pattern @ V - mixed| / max(1, max |mixed|): how far the rebuilt probabilities
        are from what the model computed, with V (batch, seq, kv_heads * d) from `v_proj` and
        `mixed` (batch, seq, heads * d) the input of `o_proj`."""
        batch, length, _ = values.shape
        values = values.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = mx.repeat(values, self.n_heads // self.n_kv_heads, axis=1).astype(mx.float32)
        rebuilt = (pattern @ values).transpose(0, 2, 1, 3).reshape(mixed.shape)
        mixed = mixed.astype(mx.float32)
        return mx.abs(rebuilt - mixed).max() / mx.maximum(mx.abs(mixed).max(), 1.0)

    def call_mask(self, module, args: tuple, kwargs: dict):
        """The mask a block passed to this attention module (`module(x, mask, cache)`)."""
        names = call_parameters(type(module))
        if "mask" not in names:
            raise AttentionCaptureError(
                f"{self.module} takes no `mask` argument ({', '.join(names)}), so mlxterp cannot "
                "tell which keys each query sees."
            )

        def argument(name: str):
            index = names.index(name)
            return args[index] if index < len(args) else kwargs.get(name)

        if "cache" in names and argument("cache") is not None:
            raise AttentionCaptureError(
                f"{self.module} was called with a KV cache; attention probabilities are read in a "
                "trace of the whole sequence, which runs without one."
            )
        return argument("mask")

    def pattern(self, queries: mx.array, keys: mx.array, mask) -> mx.array:
        """Probabilities (batch, heads, queries, keys) in float32 from the rotated queries
        (batch, heads, q, d) and keys (batch, kv_heads, k, d) and the block's mask."""
        if queries.shape[1] != self.n_heads or keys.shape[1] != self.n_kv_heads:
            raise AttentionCaptureError(
                f"{self.module}: its rope was called with {queries.shape[1]} and {keys.shape[1]} "
                f"heads, not {self.n_heads} query then {self.n_kv_heads} key heads; mlxterp "
                "rebuilds attention only for modules that rotate queries, then keys."
            )
        keys = mx.repeat(keys, self.n_heads // self.n_kv_heads, axis=1)
        scores = (queries.astype(mx.float32) * self.scale) @ keys.astype(mx.float32).swapaxes(-1, -2)
        return mx.softmax(_masked(scores, mask), axis=-1)


def _masked(scores: mx.array, mask) -> mx.array:
    """`scores` with the block's mask applied as `mx.fast.scaled_dot_product_attention` does."""
    if mask is None:
        return scores
    n_queries, n_keys = scores.shape[-2:]
    if isinstance(mask, str):
        if mask != "causal":
            raise AttentionCaptureError(f"unknown attention mask {mask!r}; mlxterp knows 'causal'.")
        # A query at position i (of the last n_queries of n_keys) sees keys 0..i.
        mask = mx.arange(n_keys - n_queries, n_keys)[:, None] >= mx.arange(n_keys)[None]
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(-mx.inf, mx.float32))
    return scores + mask.astype(mx.float32)


def attention_layouts(tree: ModuleTree) -> list[AttentionLayout]:
    """The attention module of every block, in block order: the one module inside the block
    with the children `rope`, `v_proj`, `o_proj` and the attributes `scale`, `n_heads` and
    `n_kv_heads` (mlx-lm's Llama, Qwen 2/3, Gemma 3 and most other families).

    Example:
        >>> [layout.module for layout in attention_layouts(model.tree)][:1]
        ['model.model.layers.0.self_attn']
    """
    if not tree.blocks:
        raise AttentionCaptureError("this model has no list of blocks, so no attention layers to read.")
    layouts = []
    for index, block in enumerate(tree.blocks):
        found = [name for name, module in tree.modules.items()
                 if name.startswith(block + ".") and all(hasattr(module, a) for a in ATTRIBUTES)
                 and all(f"{name}.{child}" in tree.modules for child in CHILDREN)]
        if len(found) != 1:
            children = sorted({n[len(block) + 1:].split(".")[0]
                               for n in tree.modules if n.startswith(block + ".")})
            raise AttentionCaptureError(
                f"block {index} ({block}) has {len(found) or 'no'} attention module(s) mlxterp can "
                f"read{': ' + ', '.join(found) if found else ''}. It looks for one module with the "
                f"children {', '.join(CHILDREN)} and the attributes {', '.join(ATTRIBUTES)}, as "
                f"mlx-lm's attention has; the block's children are {children}."
            )
        module = tree.modules[found[0]]
        if getattr(module, "attn_logit_softcapping", None):
            raise AttentionCaptureError(
                f"{found[0]} soft-caps its attention scores (attn_logit_softcapping = "
                f"{module.attn_logit_softcapping}, as Gemma 2 does); mlxterp rebuilds "
                "softmax(scale * q @ k^T + mask) only, so it reports no probabilities for it."
            )
        layouts.append(AttentionLayout(found[0], float(module.scale), int(module.n_heads),
                                       int(module.n_kv_heads)))
    return layouts
