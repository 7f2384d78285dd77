"""Sparse autoencoders and transcoders: TopK, BatchTopK and JumpReLU, as plain MLX modules.

An SAE reads an activation x (width `d_in`) at one site and writes `d_sae` latents and a
reconstruction:

    pre = (x - b_dec) @ W_enc + b_enc        (b_dec subtracted first: the pre-encoder bias)
    a   = activation(pre)                    (sparse, non-negative)
    x^  = a @ W_dec + b_dec

- `topk` (Gao et al. 2024): each token keeps its k largest pre-activations.
- `batchtopk` (Bussmann et al. 2024): training keeps the k * n largest over a batch of n tokens;
  inference keeps those above one threshold, the running mean of the smallest kept value, so a
  token's latents never depend on the other tokens of its batch.
- `jumprelu` (Rajamanoharan et al. 2024): a latent fires where its pre-activation exceeds its
  own threshold.
- `relu`: the original ReLU SAE (SAELens's `standard`), read from files; mlxterp does not train it.

A transcoder reads one site and reconstructs another (an MLP's input to its output): the same
module with `site_out` set, `d_out` its width and no pre-encoder bias (x and x^ live in
different spaces).

The file layout is SAELens's (`cfg.json` and `sae_weights.safetensors`): `saelens.py` beside this
file reads and writes it.

Example:
    >>> sae = SparseAutoencoder.create("layers.8", d_in=576, d_sae=4608, k=32, seed=0)
    >>> sae.encode(x).shape, sae(x).shape
    ((4, 128, 4608), (4, 128, 576))
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxterp.errors import SAEError

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")


class SparseAutoencoder(nn.Module):
    """An SAE (or, with `site_out`, a transcoder) and where it belongs: the model it was made
    for and the site it reads.

    Example:
        >>> sae = SparseAutoencoder.create("layers.8", d_in=576, d_sae=4608, k=32)
        >>> sae.architecture, sae.d_sae
        ('topk', 4608)
    """

    def __init__(
        self,
        architecture: str,
        site: str,
        d_in: int,
        d_sae: int,
        k: int | None = None,
        site_out: str | None = None,
        d_out: int | None = None,
        model: str = "",
        dtype: mx.Dtype = mx.float32,
        apply_b_dec_to_input: bool | None = None,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}."
            )
        if architecture in ("topk", "batchtopk") and not (isinstance(k, int) and 0 < k <= d_sae):
            raise SAEError(
                f"a {architecture} SAE needs k, a whole number from 1 to d_sae={d_sae}; got {k!r}."
            )
        if (site_out is None) != (d_out is None):
            raise SAEError("a transcoder needs both site_out and d_out; an SAE gives neither.")
        d_out = d_in if d_out is None else d_out
        self.architecture, self.site, self.site_out, self.k = architecture, site, site_out, k
        self.d_in, self.d_sae, self.d_out, self.model = d_in, d_sae, d_out, model
        # The pre-encoder bias; a transcoder's b_dec lives in its output space, so never there.
        self.apply_b_dec_to_input = site_out is None if apply_b_dec_to_input is None else apply_b_dec_to_input
        if self.apply_b_dec_to_input and d_out != d_in:
            raise SAEError(f"b_dec ({d_out} wide) cannot be subtracted from inputs {d_in} wide.")
        self.W_enc = mx.zeros((d_in, d_sae), dtype=dtype)
        self.b_enc = mx.zeros((d_sae,), dtype=dtype)
        self.W_dec = mx.zeros((d_sae, d_out), dtype=dtype)
        self.b_dec = mx.zeros((d_out,), dtype=dtype)
        if architecture in ("batchtopk", "jumprelu"):
            # jumprelu: one threshold per latent; batchtopk: its running threshold, the same for all
            self.threshold = mx.zeros((d_sae,), dtype=dtype)
        self.trained_on: dict = {}  # what training saw, written to the file's metadata

    @classmethod
    def create(
        cls,
        site: str,
        d_in: int,
        d_sae: int,
        architecture: str = "topk",
        k: int | None = None,
        site_out: str | None = None,
        d_out: int | None = None,
        model: str = "",
        seed: int = 0,
    ) -> SparseAutoencoder:
        """A freshly initialised SAE: unit-norm decoder rows, the encoder their transpose (as
        Gao et al. start), zero biases.

        Raises:
            SAEError: an unknown architecture, or k missing for topk / batchtopk.

        Example:
            >>> SparseAutoencoder.create("layers.8", d_in=576, d_sae=4608, k=32, seed=1)
        """
        sae = cls(architecture, site, d_in, d_sae, k, site_out, d_out, model)
        decoder = mx.random.normal((d_sae, sae.d_out), key=mx.random.key(seed))
        sae.W_dec = decoder / mx.linalg.norm(decoder, axis=1, keepdims=True)
        # A transcoder's input and output live in different spaces: its encoder starts random.
        sae.W_enc = (
            mx.random.normal((d_in, d_sae), key=mx.random.key(seed + 1)) / d_in**0.5
            if sae.is_transcoder
            else mx.contiguous(sae.W_dec.T)  # a copy: files and hashes read the bytes in order
        )
        if architecture == "jumprelu":
            sae.threshold = mx.full((d_sae,), 1e-3)
        return sae

    @property
    def is_transcoder(self) -> bool:
        return self.site_out is not None

    def pre_activations(self, x: mx.array) -> mx.array:
        x = x.astype(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: mx.array, training: bool = False) -> mx.array:
        """The latents from the pre-activations; `training` selects BatchTopK's batch-wide top."""
        if self.architecture == "topk":
            kth = mx.topk(pre, self.k, axis=-1).min(axis=-1, keepdims=True)
            return mx.where(pre >= kth, nn.relu(pre), 0.0)
        if self.architecture == "relu":
            return nn.relu(pre)
        if self.architecture == "batchtopk" and training:
            tokens = pre.size // self.d_sae
            kth = mx.topk(pre.reshape(-1), self.k * tokens).min()
            return mx.where(pre >= kth, nn.relu(pre), 0.0)
        return mx.where(pre > self.threshold, nn.relu(pre), 0.0)

    def encode(self, x: mx.array) -> mx.array:
        """The latents (..., d_sae) of activations x (..., d_in).

        Raises:
            SAEError: x's last axis is not d_in wide.

        Example:
            >>> sae.encode(x)   # (batch, positions, d_sae), at most k non-zero per token (topk)
        """
        if x.shape[-1] != self.d_in:
            raise SAEError(f"this SAE reads activations {self.d_in} wide; got shape {tuple(x.shape)}.")
        return self.activate(self.pre_activations(x))

    def decode(self, latents: mx.array) -> mx.array:
        """The reconstruction (..., d_out) from latents (..., d_sae).

        Raises:
            SAEError: latents' last axis is not d_sae wide.

        Example:
            >>> sae.decode(sae.encode(x))
        """
        if latents.shape[-1] != self.d_sae:
            raise SAEError(f"this SAE has {self.d_sae} latents; got shape {tuple(latents.shape)}.")
        return latents @ self.W_dec + self.b_dec

    def __call__(self, x: mx.array) -> mx.array:
        return self.decode(self.encode(x))

    def check_feature(self, feature: object) -> int:
        """`feature` as a latent index, or an error giving the valid range.

        Raises:
            SAEError: not a whole number in 0..d_sae-1.

        Example:
            >>> sae.check_feature(4607)
            4607
        """
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.d_sae:
            raise SAEError(
                f"feature {feature!r} does not exist: this SAE's features are 0 to {self.d_sae - 1}."
            )
        return feature

    def describe(self) -> str:
        what = "transcoder" if self.is_transcoder else "SAE"
        sparsity = f", k={self.k}" if self.k else ""
        where = f"{self.site} -> {self.site_out}" if self.is_transcoder else self.site
        return f"{self.architecture} {what} at {where}: {self.d_in} -> {self.d_sae} latents{sparsity}"

    def __repr__(self) -> str:
        return f"SparseAutoencoder({self.describe()})"
