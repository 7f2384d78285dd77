"""SAELens's file layout, read and written: a folder with `cfg.json` and `sae_weights.safetensors`.

The tensors are SAELens's (`W_enc` (d_in, d_sae), `W_dec` (d_sae, d_out), `b_enc`, `b_dec`, and
`threshold` for JumpReLU), and so are the config keys (`architecture`, `d_in`, `d_sae`, `k`,
`apply_b_dec_to_input`, `normalize_activations`, `metadata.model_name`, `metadata.hook_name`).
SAELens 6 reads what `save_saelens` writes, and `load_saelens` reads what SAELens writes
(`scripts/check_saelens.py` checks both ways with SAELens itself).

Sites are named as TransformerLens names them where SAELens users expect it
(`blocks.8.hook_resid_post` is mlxterp's `layers.8`), and mlxterp's own key is kept in
`metadata.mlxterp_site`. A BatchTopK SAE is written as SAELens writes one for inference: a
JumpReLU whose thresholds are all the learned one.

Example:
    >>> save_saelens(sae, "out/smollm2-l8-topk")
    >>> sae = load_saelens("out/smollm2-l8-topk")
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from mlxterp.errors import SAEError
from mlxterp.models.sae import SparseAutoencoder
from mlxterp.version import __version__

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"

# TransformerLens hook -> mlxterp key, per block. TransformerLens's `ln2.hook_normalized` is the
# residual normalised without the norm's weight, which mlx-lm never computes: it has no key here.
_TL_HOOKS = {
    "hook_resid_post": "",
    "hook_resid_pre": ":input",
    "hook_mlp_out": ".mlp",
    "hook_attn_out": ".self_attn",
}
_TL_HOOK = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<hook>.+)$")
_OUR_SITE = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)(?P<rest>(?:\.mlp|\.self_attn)?(?::input)?)$")
_HF_SITE = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)(?P<rest>(?:\.mlp|\.self_attn)?(?::input)?)$")

# mlxterp architecture -> SAELens's, for an SAE and for a transcoder (None: SAELens has none).
_SAELENS_ARCHITECTURE = {
    "topk": ("topk", None),
    "batchtopk": ("jumprelu", "jumprelu_transcoder"),
    "jumprelu": ("jumprelu", "jumprelu_transcoder"),
    "relu": ("standard", "transcoder"),
}
_FROM_SAELENS = {
    "topk": "topk",
    "jumprelu": "jumprelu",
    "standard": "relu",
    "transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
}


def hook_name(site: str) -> str:
    """The TransformerLens hook of an mlxterp site (`layers.8` -> `blocks.8.hook_resid_post`),
    or the site itself where TransformerLens has none."""
    match = _OUR_SITE.match(site)
    if match:
        for hook, rest in _TL_HOOKS.items():
            if rest == match["rest"]:
                return f"blocks.{match['layer']}.{hook}"
    return site


def site_of_hook(hook: str) -> str:
    """The mlxterp key of a hook name written by SAELens (TransformerLens names, or Hugging Face
    module paths such as `model.layers.8`).

    Raises:
        SAEError: a hook mlxterp does not know how to place.

    Example:
        >>> site_of_hook("blocks.8.hook_resid_post")
        'layers.8'
    """
    match = _TL_HOOK.match(hook)
    if match and match["hook"] in _TL_HOOKS:
        return f"layers.{match['layer']}{_TL_HOOKS[match['hook']]}"
    match = _HF_SITE.match(hook)
    if match:
        return f"layers.{match['layer']}{match['rest']}"
    raise SAEError(
        f"the SAE's hook {hook!r} has no place mlxterp knows; known hooks are blocks.L.hook_resid_post, "
        f"blocks.L.hook_resid_pre, blocks.L.hook_mlp_out, blocks.L.hook_attn_out and Hugging Face "
        f"paths model.layers.L[.mlp|.self_attn][:input]. (TransformerLens's ln2.hook_normalized is the "
        f"residual normalised without the norm's weight, which mlx-lm does not compute.) Pass site= "
        f"to say where it reads."
    )


def save_saelens(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `sae` as SAELens writes one: `folder/cfg.json` and `folder/sae_weights.safetensors`.

    Raises:
        SAEError: a TopK transcoder (SAELens has none).

    Example:
        >>> save_saelens(sae, "out/smollm2-l8-topk")
        PosixPath('out/smollm2-l8-topk')
    """
    sae_architecture, transcoder_architecture = _SAELENS_ARCHITECTURE[sae.architecture]
    architecture = transcoder_architecture if sae.is_transcoder else sae_architecture
    if architecture is None:
        raise SAEError(
            "SAELens has no TopK transcoder; train a batchtopk or jumprelu transcoder to share it."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if "threshold" in sae:
        weights["threshold"] = sae.threshold
    mx.save_safetensors(str(folder / WEIGHTS), weights)
    config = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("mlx.core."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": sae.model,
            "hook_name": hook_name(sae.site),
            "mlxterp_site": sae.site,
            "mlxterp_architecture": sae.architecture,
            "mlxterp_k": sae.k,
            "mlxterp_version": __version__,
            **sae.trained_on,
        },
    }
    if sae.architecture == "topk":
        config |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    if sae.is_transcoder:
        config |= {"d_out": sae.d_out}
        config["metadata"] |= {"hook_name_out": hook_name(sae.site_out), "mlxterp_site_out": sae.site_out}
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def load_saelens(folder: str | Path, site: str | None = None) -> SparseAutoencoder:
    """An SAE from a folder in SAELens's layout (written by SAELens or by `save_saelens`).

    `site` places it where its hook name does not say (mlxterp reads TransformerLens hook
    names and Hugging Face module paths).

    Raises:
        SAEError: no such folder or files, an architecture or normalisation mlxterp does not
            run, tensors that disagree with the config, or a hook mlxterp cannot place.

    Example:
        >>> sae = load_saelens("out/smollm2-l8-topk")
        >>> model.with_sae(sae)
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise SAEError(f"{str(folder)!r} is not an SAE folder: it needs {CONFIG} and {WEIGHTS}.")
    config = json.loads((folder / CONFIG).read_text())
    metadata = config.get("metadata") or {}
    architecture = config.get("architecture", "standard")
    if architecture not in _FROM_SAELENS:
        raise SAEError(
            f"{folder / CONFIG}: architecture {architecture!r} is not one mlxterp runs; "
            f"it runs {', '.join(sorted(_FROM_SAELENS))}."
        )
    if config.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{folder / CONFIG}: rescale_acts_by_decoder_norm is true; mlxterp runs TopK SAEs "
                       "without that rescaling. Fold the decoder norms into the encoder first.")
    if config.get("normalize_activations", "none") != "none":
        raise SAEError(
            f"{folder / CONFIG}: normalize_activations is {config['normalize_activations']!r}; "
            "mlxterp runs SAEs with the normalisation folded into the weights ('none')."
        )
    weights = mx.load(str(folder / WEIGHTS))
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if "jumprelu" in architecture else set())
    if set(weights) != expected:
        raise SAEError(
            f"{folder / WEIGHTS} holds {sorted(weights)}; a {architecture} SAE has {sorted(expected)}."
        )
    ours = metadata.get("mlxterp_architecture") or _FROM_SAELENS[architecture]
    transcoder = "transcoder" in architecture
    site = site or metadata.get("mlxterp_site") or site_of_hook(_required(metadata, "hook_name", folder))
    site_out = (
        metadata.get("mlxterp_site_out") or site_of_hook(_required(metadata, "hook_name_out", folder))
        if transcoder
        else None
    )
    sae = SparseAutoencoder(
        ours,
        site,
        config["d_in"],
        config["d_sae"],
        config.get("k") or metadata.get("mlxterp_k"),
        site_out,
        config.get("d_out") if transcoder else None,
        metadata.get("model_name") or "",
        apply_b_dec_to_input=config.get("apply_b_dec_to_input", not transcoder),
    )
    for name, array in weights.items():
        if array.shape != sae[name].shape:
            raise SAEError(
                f"{folder / WEIGHTS}: {name} is {tuple(array.shape)}; cfg.json makes it "
                f"{tuple(sae[name].shape)}."
            )
    sae.update(weights)
    sae.trained_on = {
        key: value
        for key, value in metadata.items()
        if key not in ("model_name", "hook_name", "hook_name_out") and not key.startswith("mlxterp_")
    }
    return sae


def _required(metadata: dict, key: str, folder: Path) -> str:
    if not metadata.get(key):
        raise SAEError(f"{folder / CONFIG} does not say where the SAE reads (metadata.{key}); pass site=.")
    return metadata[key]
