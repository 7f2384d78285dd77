"""Training sparse autoencoders and transcoders in MLX, on activations streamed from the model.

One loop for every architecture. Each step reads a batch from an `ActivationStream` and takes
one Adam step on

    loss = FVU(x^, y) + aux

where FVU is the batch's squared error over its variance (scale-free, 1.0 for the mean alone)
and `aux` is, for TopK and BatchTopK, Gao et al.'s AuxK loss (dead latents, those silent for
the last `DEAD_AFTER_TOKENS`, reconstruct the error, weighted 1/32), for JumpReLU the L0
penalty `sparsity * L0` with straight-through gradients for the thresholds (Rajamanoharan et
al. 2024, rectangle kernel of width `JUMPRELU_BANDWIDTH`).

Details that matter:
- Inputs are scaled so that their mean squared norm is d_in (outputs likewise), and the scale is
  folded into the weights at the end: the saved SAE reads the model's own activations.
- Decoder rows are kept at unit norm (the gradient's part along each row removed before the
  step, the row renormalised after), b_dec starts at the mean of the first batch.
- The rate warms up over 1 % of the steps and decays linearly to 0 over the last 20 %.
- A checkpoint (SAE, optimizer state, dead-latent counters, step) is written every
  `checkpoint_every` steps; the same call finds it and goes on, with the batches a run that
  never stopped would have seen (the stream is a function of the seed and the step).

Example:
    >>> train, held_out = debian_docs()
    >>> sae = train_sae(model, "layers.8", train, steps=3000, checkpoint="runs/l8")
    >>> save_saelens(sae, "out/smollm2-l8-topk")
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxterp.errors import InputTypeError, SAEError
from mlxterp.experiments.data.activations import ActivationStream
from mlxterp.experiments.data.corpus import token_windows
from mlxterp.models.identity import model_name, weights_sha256
from mlxterp.models.sae import ARCHITECTURES, SparseAutoencoder

DEAD_AFTER_TOKENS = 1_000_000  # a latent silent this long is dead (AuxK trains it, stats count it)
AUXK_WEIGHT = 1 / 32
JUMPRELU_BANDWIDTH = 1e-3
THRESHOLD_MOMENTUM = 0.99  # BatchTopK's running threshold


@mx.custom_function
def _heaviside(pre: mx.array, threshold: mx.array) -> mx.array:
    """Heaviside(pre - threshold), with a pseudo-derivative for the threshold."""
    return (pre > threshold).astype(pre.dtype)


@_heaviside.vjp
def _heaviside_vjp(primals, cotangent, output):
    pre, threshold = primals
    window = (mx.abs(pre - threshold) < JUMPRELU_BANDWIDTH / 2).astype(pre.dtype)
    grad_threshold = -(cotangent * window / JUMPRELU_BANDWIDTH)
    return mx.zeros_like(pre), grad_threshold.reshape(-1, threshold.size).sum(axis=0)


def _jumprelu_training(pre: mx.array, threshold: mx.array) -> tuple[mx.array, mx.array]:
    """(latents, L0 per token): the threshold learns through the step function's
    pseudo-derivative; the latents' values through pre."""
    gate = _heaviside(pre, threshold)
    # The second term is zero in value; it carries d latents / d threshold = -threshold * kernel.
    latents = nn.relu(pre) * mx.stop_gradient(gate) + threshold * (gate - mx.stop_gradient(gate))
    return latents, gate.sum(-1)


def _fvu(prediction: mx.array, target: mx.array) -> mx.array:
    error = ((prediction - target) ** 2).sum()
    return error / ((target - target.mean(axis=0)) ** 2).sum()


def _loss(
    sae: SparseAutoencoder, x: mx.array, y: mx.array, dead: mx.array, sparsity: float
) -> tuple[mx.array, tuple]:
    pre = sae.pre_activations(x)
    if sae.architecture == "jumprelu":
        latents, l0 = _jumprelu_training(pre, sae.threshold)
        reconstruction = latents @ sae.W_dec + sae.b_dec
        fvu = _fvu(reconstruction, y)
        return fvu + sparsity * l0.mean(), (fvu, latents)
    latents = sae.activate(pre, training=True)
    reconstruction = latents @ sae.W_dec + sae.b_dec
    fvu = _fvu(reconstruction, y)
    # AuxK: the dead latents' top pre-activations reconstruct what the live ones missed.
    k_aux = min(sae.d_out // 2, sae.d_sae)  # Gao et al.: half the width reconstructed
    dead_pre = mx.where(dead, pre, -mx.inf)
    kth = mx.topk(dead_pre, k_aux, axis=-1).min(axis=-1, keepdims=True)
    aux_latents = mx.where((dead_pre >= kth) & dead, nn.relu(pre), 0.0)
    error = mx.stop_gradient(y - reconstruction)
    aux = _fvu(aux_latents @ sae.W_dec, error)
    any_dead = dead.any()
    return fvu + mx.where(any_dead, AUXK_WEIGHT * aux, 0.0), (fvu, latents)


def _schedule(learning_rate: float, steps: int):
    """Linear warm-up over 1 % of the steps (from rate / warm-up, so the first step moves),
    constant, then linear decay to 0 over the last 20 %."""
    warmup = max(1, steps // 100)
    decay = max(1, steps // 5)
    constant = max(1, steps - warmup - decay)
    return optim.join_schedules(
        [
            optim.linear_schedule(learning_rate / warmup, learning_rate, warmup),
            optim.linear_schedule(learning_rate, learning_rate, constant),
            optim.linear_schedule(learning_rate, 0.0, decay),
        ],
        [warmup, warmup + constant],
    )


def train_sae(
    model,
    site: str,
    texts: Sequence[str],
    architecture: str = "topk",
    expansion: int = 8,
    k: int | None = 32,
    site_out: str | None = None,
    steps: int = 2000,
    batch_tokens: int = 4096,
    length: int = 128,
    learning_rate: float | None = None,
    sparsity: float = 1e-3,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 200,
    progress: bool | None = None,
) -> SparseAutoencoder:
    """Train an SAE on `model`'s activations at `site` (with `site_out`, a transcoder from
    `site` to `site_out`) over `texts`: `steps` batches of `batch_tokens` tokens from windows of
    `length` tokens (the first token of each window, the attention sink, left out). `expansion`:
    latents per input feature; `k`: latents per token (topk, batchtopk); `sparsity`: the L0
    penalty (jumprelu). `learning_rate` None: Gao et al.'s 2e-4 scaled by 1/sqrt(latents / 2^14).
    `progress`: a bar with loss, L0 and dead fraction (None: when stderr is a terminal).

    Raises:
        InputTypeError: counts that are no positive whole numbers.
        SAEError: an unknown architecture, or a checkpoint made by another configuration.
        NotReachedError: a site the model never calls.

    Example:
        >>> sae = train_sae(model, "layers.8", debian_docs()[0], steps=3000, checkpoint="runs/l8")
    """
    from tqdm.auto import tqdm

    for name, value in (
        ("expansion", expansion),
        ("steps", steps),
        ("batch_tokens", batch_tokens),
        ("length", length),
        ("checkpoint_every", checkpoint_every),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputTypeError(f"{name} must be a positive whole number; got {value!r}.")
    if architecture not in ARCHITECTURES or architecture == "relu":
        raise SAEError(
            f"train_sae trains {', '.join(a for a in ARCHITECTURES if a != 'relu')}; got {architecture!r}."
        )
    if learning_rate is not None and not (isinstance(learning_rate, float | int) and 0 < learning_rate < 1):
        raise InputTypeError(f"learning_rate={learning_rate!r}: give a rate above 0 and below 1, or None.")
    if isinstance(sparsity, bool) or not isinstance(sparsity, float | int) or sparsity < 0:
        raise InputTypeError(f"sparsity={sparsity!r}: give the L0 penalty, a number from 0.")
    sites = [model.tree.site(site).key] + ([model.tree.site(site_out).key] if site_out else [])
    stream = ActivationStream(model, sites, token_windows(model, texts, length), batch_tokens, seed=seed)
    widths = stream.widths
    d_sae = expansion * widths[0]
    if learning_rate is None:
        learning_rate = 2e-4 / (d_sae / 2**14) ** 0.5
    config = {
        "model": model_name(model.model),
        "model_sha256": weights_sha256(model.model),
        "architecture": architecture,
        "site": sites[0],
        "site_out": site_out and sites[1],
        "d_sae": d_sae,
        "k": k if architecture != "jumprelu" else None,
        "steps": steps,
        "batch_tokens": batch_tokens,
        "length": length,
        "learning_rate": learning_rate,
        "sparsity": sparsity if architecture == "jumprelu" else None,
        "seed": seed,
        "texts_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
    }
    sae = SparseAutoencoder.create(
        sites[0],
        widths[0],
        d_sae,
        architecture,
        config["k"],
        config["site_out"],
        widths[-1] if site_out else None,
        model_name(model.model),
        seed,
    )
    # Scales that give the inputs (and outputs) a mean squared norm of their width.
    first = stream.batch(0)
    scales = [float((w / (a**2).sum(-1).mean()) ** 0.5) for w, a in zip(widths, first, strict=True)]
    sae.b_dec = first[-1].mean(axis=0) * scales[-1]
    if architecture == "batchtopk":
        sae.freeze(keys="threshold")  # a running statistic, not a parameter the loss moves
    # MLX's Adam without bias correction (its default): its first steps are larger than the
    # nominal rate (about 3x at step 100), which the warm-up tempers. The study of docs/sae.md
    # trained so; a change here would change every number there.
    optimizer = optim.Adam(learning_rate=_schedule(learning_rate, steps), eps=6.25e-10, bias_correction=False)
    silent = mx.zeros((d_sae,), dtype=mx.int32)  # tokens since each latent last fired
    state = {"config": config, "step": 0, "scales": scales, "history": [], "seconds": 0.0}
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and (folder / CHECKPOINT).exists():
        state, silent = _resume(folder, config, sae, optimizer)
    start, scales, history = state["step"], state["scales"], state["history"]

    def step_loss(x, y, dead):
        return _loss(sae, x * scales[0], y * scales[-1], dead, sparsity)

    loss_and_grad = nn.value_and_grad(sae, step_loss)
    shown = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(start, steps), desc=f"{architecture} SAE", initial=start, total=steps, disable=not shown)
    started = time.perf_counter() - state["seconds"]
    for step in bar:
        batch = stream.batch(step)
        (loss, (fvu, latents)), grads = loss_and_grad(batch[0], batch[-1], silent >= DEAD_AFTER_TOKENS)
        # Unit-norm decoder rows: only the gradient across each row moves it.
        rows = sae.W_dec
        grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * rows).sum(-1, keepdims=True) * rows
        optimizer.update(sae, grads)
        sae.W_dec = sae.W_dec / mx.linalg.norm(sae.W_dec, axis=1, keepdims=True)
        fired = latents > 0
        # capped where it counts as dead, so that a long run never overflows int32
        silent = mx.where(fired.any(axis=0), 0, mx.minimum(silent + batch_tokens, DEAD_AFTER_TOKENS))
        if architecture == "jumprelu":  # below 0 a threshold means nothing: the ReLU cuts first
            sae.threshold = mx.maximum(sae.threshold, 0.0)
        if architecture == "batchtopk":
            smallest = mx.where(fired, latents, mx.inf).min()
            sae.threshold = THRESHOLD_MOMENTUM * sae.threshold + (1 - THRESHOLD_MOMENTUM) * smallest
        mx.eval(sae.parameters(), optimizer.state, silent, loss, fvu)
        if step % 10 == 0 or step == steps - 1:
            l0 = fired.sum(-1).astype(mx.float32).mean().item()
            dead = (silent >= DEAD_AFTER_TOKENS).astype(mx.float32).mean().item()
            history.append({"step": step, "loss": loss.item(), "fvu": fvu.item(), "l0": l0, "dead": dead})
            bar.set_postfix(loss=f"{loss.item():.4f}", L0=f"{l0:.1f}", dead=f"{dead:.1%}")
        if folder is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
            state |= {"step": step + 1, "history": history, "seconds": time.perf_counter() - started}
            _save_checkpoint(folder, state, sae, optimizer, silent)
    seconds = time.perf_counter() - started
    sae.trained_on = {
        "steps": steps,
        "tokens": steps * batch_tokens,
        "context_size": length,
        "batch_tokens": batch_tokens,
        "learning_rate": learning_rate,
        "seed": seed,
        "texts": len(texts),
        "texts_sha256": config["texts_sha256"],
        "tokens_per_second": round(steps * batch_tokens / seconds),
        # every 10th step's numbers, thinned to about 20 (and the last) for the file's metadata
        "history": history[:-1][:: max(1, len(history) // 20)] + history[-1:],
    }
    return _folded(sae, scales)


def _folded(sae: SparseAutoencoder, scales: list[float]) -> SparseAutoencoder:
    """The SAE rewritten to read and write unscaled activations. With input scale s and output
    scale t: pre = (x s - b) W_enc + b_enc = (x - b/t) (s W_enc) + b_enc when s = t (an SAE), and
    x^ = (a W_dec + b) / t; thresholds, on pre, stay."""
    sae.W_enc = sae.W_enc * scales[0]
    sae.W_dec = sae.W_dec / scales[-1]
    sae.b_dec = sae.b_dec / scales[-1]
    return sae


CHECKPOINT = "state.safetensors"  # weights, optimizer, counters; settings and step in its metadata


def _save_checkpoint(folder: Path, state: dict, sae: SparseAutoencoder, optimizer, silent: mx.array) -> None:
    """One file, replaced whole: a checkpoint is never half of one step and half of another."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"sae.{name}": a for name, a in tree_flatten(sae.parameters())}
    arrays |= {f"optimizer.{name}": a for name, a in tree_flatten(optimizer.state)}
    arrays["silent"] = silent
    partial = folder / f".{CHECKPOINT}.partial.safetensors"
    mx.save_safetensors(str(partial), arrays, metadata={"state": json.dumps(state)})
    partial.replace(folder / CHECKPOINT)


def _resume(folder: Path, config: dict, sae: SparseAutoencoder, optimizer) -> tuple[dict, mx.array]:
    arrays, metadata = mx.load(str(folder / CHECKPOINT), return_metadata=True)
    state = json.loads(metadata["state"])
    if state["config"] != config:
        changed = sorted(key for key in config if state["config"].get(key) != config[key])
        raise SAEError(
            f"the checkpoint in {str(folder)!r} was made with other settings ({', '.join(changed)}); "
            "give the same settings to resume it, or another checkpoint folder."
        )
    sae.update(tree_unflatten([(n[4:], a) for n, a in arrays.items() if n.startswith("sae.")]))
    optimizer.state = tree_unflatten([(n[10:], a) for n, a in arrays.items() if n.startswith("optimizer.")])
    return state, arrays["silent"]
