"""Splicing a sparse autoencoder into a model, as a new model value that shares every weight.

`spliced(root, tree, sae)` returns a copy of the module tree in which only the path from the
root to the SAE's host module is new (equinox-style surgery: the rest is shared, the original
untouched). The host's copy (`surgery.with_call`: a subclass of its class) runs the host's own
code and then hands its activation to a `Splice`, a child named `sae`, so the spliced model
names three new modules beside the old ones:

- `layers.8.sae.features`: the latents (batch, positions, d_sae), read and intervened on like
  any module output, and patched feature by feature as `Site(..., head=k, n_heads=d_sae)`;
- `layers.8.sae.error`: what the SAE misses, activation minus reconstruction (its own site);
- `layers.8.sae.autoencoder`: the SAE's weights.

The forward goes on with reconstruction + error. Unchanged latents and error give back the
activation itself, so the spliced model computes bit for bit what the model computes; a change
to either adds exactly its difference.

Example:
    >>> root = spliced(model.model, model.tree, sae, "model.model.layers.8", on_input=False)
    >>> InterpretableModel(root, tokenizer).trace(...)      # what model.with_sae(sae) does
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxterp.models.sae import SparseAutoencoder
from mlxterp.tracing.intercept import call_input, with_call_input
from mlxterp.tracing.names import ModuleTree
from mlxterp.tracing.surgery import replaced, with_call


class Features(nn.Identity):
    """The hook of an SAE's latents: its output is what the splice decodes."""

    slice_name = "feature"  # what a site's slice of it is called in results (`head` elsewhere)


class Error(nn.Identity):
    """The hook of an SAE's error term (activation minus reconstruction)."""


class Splice(nn.Module):
    """An SAE between its host module and the rest of the model (see the module docstring).

    Example:
        >>> Splice(sae)(x, x)      # x itself; with an intervention on `features`, changed by it
    """

    def __init__(self, sae: SparseAutoencoder, on_input: bool = False):
        super().__init__()
        self.autoencoder = sae
        self.features = Features()
        self.error = Error()
        self.on_input = on_input  # the SAE stands between the host's input and the host

    def __call__(self, read: mx.array, replaced: mx.array) -> mx.array:
        """`replaced` (the activation the SAE reconstructs) after the SAE has read `read` (the
        same activation for an SAE, the MLP's input for a transcoder)."""
        latents = self.autoencoder.encode(read)
        reconstruction = self.autoencoder.decode(latents)
        error = replaced.astype(reconstruction.dtype) - reconstruction
        new_latents, new_error = self.features(latents), self.error(error)
        if new_latents is latents and new_error is error:
            return replaced
        change = (
            (new_error - error)
            if new_latents is latents
            else (self.autoencoder.decode(new_latents) - reconstruction + (new_error - error))
        )
        return (replaced.astype(change.dtype) + change).astype(replaced.dtype)


def _spliced_call(host: nn.Module, call, args: tuple, kwargs: dict):
    """The host's own `call`, with the splice on its input (an SAE of `name:input`), or on its
    output (an SAE of `name`, reading it; a transcoder, reading the input)."""
    splice = host.sae
    if splice.on_input:
        x = call_input(host, args, kwargs)
        args, kwargs = with_call_input(host, args, kwargs, splice(x, x))
        return call(host, *args, **kwargs)
    output = call(host, *args, **kwargs)
    return splice(call_input(host, args, kwargs) if splice.autoencoder.is_transcoder else output, output)


def spliced(root: nn.Module, tree: ModuleTree, sae: SparseAutoencoder, host: str,
            on_input: bool) -> nn.Module:
    """A copy of `root` with `sae` spliced into the call of `host` (a full name in `tree`), on
    its input or its output; only the modules on the path from the root to the host are copied,
    every weight is shared.

    Example:
        >>> new_root = spliced(model.model, model.tree, sae, "model.model.layers.8", on_input=False)
        >>> new_root.model.layers[8].sae.autoencoder is sae
        True
    """
    copy = with_call(tree.modules[host], _spliced_call)
    copy.sae = Splice(sae, on_input)
    return replaced(root, tree, {host: copy})
