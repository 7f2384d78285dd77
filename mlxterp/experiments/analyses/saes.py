"""SAEs at work: spliced into a model, their features as sites, measured and shown.

- `with_sae(model, sae)`: the model with the SAE spliced at its site (a new model value sharing
  every weight; see `tracing/splice.py`), after checking width, dtype, model and site.
- `feature_site(model, feature, positions)`: feature k of the spliced SAE as a `Site`, for
  interventions (ablate, clamp, steer), `patching_sweep(sites=...)` and `attribution_patching`;
  `error_site` is the error term's.
- `evaluate_sae`: SAEBench's core metrics on held-out text: L0, fraction of variance unexplained,
  cross-entropy loss recovered, dead and dense latent fractions.
- `feature_dashboards`: per feature, its top-activating contexts with every token's
  activation, a histogram of its activations, and the tokens its decoder direction promotes and
  suppresses through the unembedding.

Example:
    >>> spliced = model.with_sae(load_saelens("docs/img/sae-smollm2-l8"))
    >>> with spliced.trace(prompt, interventions={feature_site(spliced, 1234): iv.scale(0.0)}):
    ...     logits = spliced.output.save()
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputTypeError, SAEError
from mlxterp.experiments.analyses.lenses import Unembedding
from mlxterp.experiments.data.activations import collect
from mlxterp.experiments.pipeline.results import VIEWS
from mlxterp.interventions import at_positions, zero_out
from mlxterp.models.identity import model_name
from mlxterp.models.sae import SparseAutoencoder
from mlxterp.paths import output_path, write_atomically
from mlxterp.tracing.names import Site
from mlxterp.tracing.splice import Splice, spliced

DENSE_ABOVE = 0.1  # a latent firing on more than 10 % of tokens is dense (SAEBench)


def with_sae(model, sae: SparseAutoencoder):
    """`model` with `sae` spliced at its site: a new InterpretableModel sharing every weight,
    whose output is bit for bit the model's until its features or error are changed. An SAE
    of `name` reconstructs that module's output, one of `name:input` its input; a transcoder
    reads `name:input` and reconstructs `name`.

    Raises:
        SAEError: a width or dtype that does not match the site, an SAE made for another
            model, a transcoder whose sites are not one module's input and output, a model
            that already has an SAE.
        UnknownModuleError: a site this model does not have.
        NotReachedError: a site the model never calls.

    Example:
        >>> spliced = model.with_sae(sae)
        >>> with spliced.trace("The capital of France is") as trace:
        ...     latents = trace.activations["layers.8.sae.features"]
    """
    if not isinstance(sae, SparseAutoencoder):
        raise SAEError(
            f"with_sae takes a SparseAutoencoder (load_saelens or train_sae make one); got "
            f"{type(sae).__name__}."
        )
    name = model_name(model.model)
    if sae.model and _normalised(sae.model) != _normalised(name):
        raise SAEError(
            f"this SAE was made for {sae.model!r}; the model is {name!r}. Load the SAE "
            f"made for this model, or set sae.model = {name!r} if they are the same model."
        )
    sites = _sites(model, sae)
    if sae.is_transcoder and (sites[1].is_input or sites[0] != replace(sites[1], is_input=True)):
        raise SAEError(
            f"a transcoder splices into one module's call, reading its input and replacing its "
            f"output: site {sae.site!r} must be site_out {sae.site_out!r} followed by ':input'."
        )
    if any(isinstance(m, Splice) for m in model.tree.modules.values()):
        raise SAEError("this model already has an SAE spliced in; splice into the model without one.")
    found = collect(model, mx.array([[0]]), sites)
    for site, activation, width in zip(sites, found, (sae.d_in, sae.d_out), strict=False):
        if activation.shape[-1] != width:
            raise SAEError(
                f"the SAE expects activations {width} wide at {site.key}; they are "
                f"{activation.shape[-1]} wide there."
            )
    dtype = sae.W_enc.dtype
    if dtype != mx.float32 and dtype != found[0].dtype:
        raise SAEError(
            f"the SAE is {dtype} and the site's activations are {found[0].dtype}; use a float32 "
            f"SAE (sae.set_dtype(mx.float32)) or one of the activations' dtype."
        )
    on_input = sites[0].is_input and not sae.is_transcoder
    root = spliced(model.model, model.tree, sae, sites[-1].module, on_input)
    return type(model)(root, model.tokenizer)  # the wrapper's own class


def _sites(model, sae: SparseAutoencoder) -> list[Site]:
    """The SAE's site, and a transcoder's output site, resolved in `model`."""
    return [model.tree.site(sae.site)] + ([model.tree.site(sae.site_out)] if sae.is_transcoder else [])


def _normalised(name: str) -> str:
    return name.lower().rstrip("/").rpartition("/")[2]


def _splice(model) -> tuple[str, SparseAutoencoder]:
    """(full name of the splice, its SAE) in a model `with_sae` made."""
    for name, module in model.tree.modules.items():
        if isinstance(module, Splice):
            return name, module.autoencoder
    raise SAEError("this model has no SAE spliced in; make one with model.with_sae(sae).")


def feature_site(model, feature: int, positions: tuple[int, ...] | None = None) -> Site:
    """Feature `feature` of the SAE spliced into `model`, at `positions` (None: all), as a site.

    Raises:
        SAEError: a model without an SAE, a feature out of range.

    Example:
        >>> spliced.patching_sweep(clean, corrupted, sites=[feature_site(spliced, k) for k in top])
    """
    name, sae = _splice(model)
    return Site(f"{name}.features", positions=positions, head=sae.check_feature(feature), n_heads=sae.d_sae)


def error_site(model, positions: tuple[int, ...] | None = None) -> Site:
    """The error term (activation minus reconstruction) of the SAE spliced into `model`.

    Raises:
        SAEError: a model without an SAE.

    Example:
        >>> spliced.patching_sweep(clean, corrupted, sites=[error_site(spliced)])
    """
    return Site(f"{_splice(model)[0]}.error", positions=positions)


BOOTSTRAP_SAMPLES = 1000


@dataclass
class SAEEvaluation:
    """SAEBench's core metrics of one SAE on held-out tokens (position 0 of each window left out).

    `loss_recovered` = (CE ablated - CE spliced) / (CE ablated - CE clean): the SAE's
    reconstruction in place of the activation (no error term), between the clean model (1) and
    the site zero-ablated (0). The intervals are 95 % bootstrap intervals over windows (1,000
    resamples, seeded): what another draw of held-out text of the same size would give.

    Example:
        >>> evaluate_sae(model, sae, held_out).fvu
        0.09
    """

    l0: float
    fvu: float
    fvu_interval: tuple[float, float]
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    loss_recovered: float
    loss_recovered_interval: tuple[float, float]
    dead_fraction: float
    dense_fraction: float
    tokens: int
    ce_tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_sae(
    model, sae: SparseAutoencoder, windows: mx.array, ce_windows: int = 64, batch_windows: int = 16
) -> SAEEvaluation:
    """L0, FVU, dead and dense fractions over all `windows` (n, length) of held-out token ids,
    and the loss recovered over the first `ce_windows` of them, with bootstrap intervals over
    windows. Transcoders are measured on their output site.

    Raises:
        SAEError: an SAE that does not fit the model (see `with_sae`).

    Example:
        >>> evaluate_sae(model, sae, token_windows(model, held_out, 128)[:400])
    """
    if not isinstance(windows, mx.array) or windows.ndim != 2 or windows.shape[1] < 3:
        raise InputTypeError(f"windows: give token ids as an mx.array (n, length) with length at least 3 "
                             f"(token_windows makes them); got {getattr(windows, 'shape', type(windows))}.")
    if isinstance(ce_windows, bool) or not isinstance(ce_windows, int) or ce_windows < 1:
        raise InputTypeError(f"ce_windows={ce_windows!r}: give a whole number from 1.")
    spliced_model = with_sae(model, sae)
    sites = _sites(model, sae)
    fired = np.zeros(sae.d_sae, dtype=np.int64)
    active = 0
    errors, sums, squares = [], [], []  # per window: squared error, sum and sum of squares of y
    for start in range(0, len(windows), batch_windows):
        found = collect(model, windows[start : start + batch_windows], sites)
        x, y = (a[:, 1:].astype(mx.float32) for a in (found[0], found[-1]))
        latents = sae.encode(x)
        on = latents > 0
        error = ((sae.decode(latents) - y) ** 2).sum(axis=(1, 2))
        mx.eval(error, on, y)
        active += on.sum().item()
        fired += np.array(on.sum(axis=(0, 1)))
        errors.append(np.array(error, dtype=np.float64))
        sums.append(np.array(y.sum(axis=1), dtype=np.float64))
        squares.append(np.array((y**2).sum(axis=1), dtype=np.float64))
    errors, sums, squares = np.concatenate(errors), np.concatenate(sums), np.concatenate(squares)
    per_window = windows.shape[1] - 1
    splice_name = _splice(spliced_model)[0]
    # Position 0 (the attention sink, which training leaves out) keeps its error term and is
    # not ablated: the three runs differ where the metrics above are measured.
    from_position_1 = at_positions(list(range(1, windows.shape[1])), zero_out)
    ce = {
        what: _cross_entropy(runner, windows[:ce_windows], interventions, batch_windows)
        for what, runner, interventions in (
            ("clean", model, None),
            ("spliced", spliced_model, {f"{splice_name}.error": from_position_1}),
            ("ablated", model, {sites[-1].key: from_position_1}),
        )
    }

    def fvu(rows):
        n = len(rows) * per_window
        variance = (squares[rows].sum(0) - sums[rows].sum(0) ** 2 / n).sum()
        return errors[rows].sum() / variance

    def recovered(rows):
        clean, spliced_, ablated = (ce[w][rows].mean() for w in ("clean", "spliced", "ablated"))
        return (ablated - spliced_) / (ablated - clean)

    rng = np.random.default_rng(0)
    every, every_ce = np.arange(len(errors)), np.arange(len(ce["clean"]))
    fvus = [fvu(rng.choice(every, len(every))) for _ in range(BOOTSTRAP_SAMPLES)]
    recoveries = [recovered(rng.choice(every_ce, len(every_ce))) for _ in range(BOOTSTRAP_SAMPLES)]
    tokens = len(errors) * per_window
    return SAEEvaluation(
        l0=active / tokens,
        fvu=float(fvu(every)),
        fvu_interval=tuple(float(v) for v in np.percentile(fvus, [2.5, 97.5])),
        ce_clean=float(ce["clean"].mean()),
        ce_spliced=float(ce["spliced"].mean()),
        ce_ablated=float(ce["ablated"].mean()),
        loss_recovered=float(recovered(every_ce)),
        loss_recovered_interval=tuple(float(v) for v in np.percentile(recoveries, [2.5, 97.5])),
        dead_fraction=float((fired == 0).mean()),
        dense_fraction=float((fired > DENSE_ABOVE * tokens).mean()),
        tokens=int(tokens),
        ce_tokens=int(len(every_ce) * (windows.shape[1] - 2)),
    )


def _cross_entropy(model, windows: mx.array, interventions, batch_windows: int) -> np.ndarray:
    """Each window's mean next-token cross-entropy (nats), predictions from position 1 on."""
    losses = []
    for start in range(0, len(windows), batch_windows):
        tokens = windows[start : start + batch_windows]
        with model.trace(tokens, interventions=interventions, capture=[]):
            logits = model.output.save()
        logits = logits[:, 1:-1].astype(mx.float32)
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        loss = -mx.take_along_axis(log_probs, tokens[:, 2:, None], axis=-1)
        losses.append(np.array(loss[..., 0].mean(axis=1)))
    return np.concatenate(losses)


def frequent_features(model, sae: SparseAutoencoder, windows: mx.array, count: int) -> list[int]:
    """The `count` features that fire on the most tokens of `windows` (position 0 left out).

    Raises:
        NotReachedError: a site the model never calls.

    Example:
        >>> feature_dashboards(model, sae, windows, features=frequent_features(model, sae, windows[:8], 50))
    """
    (x,) = collect(model, windows, [model.tree.site(sae.site)])
    fired = (sae.encode(x[:, 1:]) > 0).sum(axis=(0, 1))
    return np.argsort(-np.array(fired), kind="stable")[:count].tolist()


@dataclass
class FeatureDashboard:
    """One feature: where it fires most (tokens around each top activation, every token's
    activation), how its activations spread, and what its decoder direction does to the logits.

    Example:
        >>> board = dashboards[1234]
        >>> board.contexts[0]["tokens"], board.promoted[:3]
    """

    feature: int
    frequency: float  # fraction of tokens it fires on
    max_activation: float
    contexts: list[dict]  # {"tokens": [...], "activations": [...], "top": index of the top token}
    histogram: dict  # {"edges": [...], "counts": [...]} of its non-zero activations
    promoted: list[tuple[str, float]]  # tokens whose logits its decoder direction raises most
    suppressed: list[tuple[str, float]]


@dataclass
class FeatureDashboards:
    """Dashboards of some features of one SAE, over the same held-out tokens.

    Example:
        >>> dashboards = feature_dashboards(model, sae, windows, features=[12, 99])
        >>> dashboards.to_html("features.html")
    """

    sae: str  # what the SAE is (`SparseAutoencoder.describe`)
    model: str
    tokens: int
    boards: dict[int, FeatureDashboard] = field(default_factory=dict)

    def __getitem__(self, feature: int) -> FeatureDashboard:
        if feature not in self.boards:
            raise SAEError(f"no dashboard for feature {feature}; these have one: {sorted(self.boards)[:20]}.")
        return self.boards[feature]

    def to_json(self) -> dict:
        return {
            "sae": self.sae,
            "model": self.model,
            "tokens": self.tokens,
            "boards": [asdict(board) for board in self.boards.values()],
        }

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the dashboards as JSON.

        Raises:
            OutputPathError: a path that is not .json, or exists without overwrite.

        Example:
            >>> dashboards.save("features.json")
        """
        path = output_path(path, {".json"}, overwrite)
        return write_atomically(path, lambda p: p.write_text(json.dumps(self.to_json())))

    def to_html(self, path: str | Path, overwrite: bool = False) -> Path:
        """One self-contained page: every feature's dashboard, searchable by feature number or by
        a token it fires on or promotes.

        Raises:
            OutputPathError: a path that is not .html, or exists without overwrite.

        Example:
            >>> dashboards.to_html("features.html")
        """
        return VIEWS["features_html"](self, path, overwrite=overwrite)


def feature_dashboards(
    model,
    sae: SparseAutoencoder,
    windows: mx.array,
    features: list[int],
    contexts: int = 10,
    context_tokens: int = 12,
    batch_windows: int = 16,
    logit_tokens: int = 10,
) -> FeatureDashboards:
    """Dashboards of `features` over held-out `windows` (n, length) of token ids: each feature's
    `contexts` top activations with `context_tokens` tokens before each, its histogram, and the
    `logit_tokens` tokens its decoder row promotes and suppresses (the row times the final norm's
    weight and the unembedding, as TransformerLens folds them: the norm's scale by the whole
    residual is left out, as it is the same for every token).

    Raises:
        SAEError: a feature out of range, a transcoder whose output is not the residual stream.

    Example:
        >>> feature_dashboards(model, sae, token_windows(model, held_out, 128)[:400], features=[7, 99])
    """
    features = [sae.check_feature(f) for f in features]
    chosen = mx.array(features)
    sites = [model.tree.site(sae.site)]
    values = []
    for start in range(0, len(windows), batch_windows):
        (x,) = collect(model, windows[start : start + batch_windows], sites)
        latents = sae.encode(x.astype(mx.float32))[..., chosen]  # (windows, positions, features)
        latents[:, 0] = 0  # position 0 is the attention sink, left out as in training
        mx.eval(latents)
        values.append(np.array(latents))
    activations = np.concatenate(values)  # (n, length, features): small for a few hundred features
    n, length, _ = activations.shape
    head = Unembedding.of(model)
    unembedding = model.tree.modules[head.unembedding]
    directions = sae.W_dec[chosen]
    if directions.shape[-1] != head.width:
        raise SAEError(f"the decoder writes {directions.shape[-1]} wide, the unembedding reads {head.width}: "
                       "its logit effects need an SAE of the residual stream.")
    norm = model.tree.modules.get(head.norm) if head.norm else None
    if norm is not None and "weight" in norm:  # the norm's per-dimension weight, as TransformerLens folds it
        directions = directions * norm.weight
    logits = np.array(unembedding.as_linear(directions) if head.tied else unembedding(directions))
    tokenizer = model.tokenizer
    boards = {}
    for column, feature in enumerate(features):
        acts = activations[:, :, column]
        flat = acts.reshape(-1)
        order = np.argsort(-flat)[:contexts]
        tops = []
        for index in order:
            if flat[index] <= 0:
                break
            row, position = divmod(int(index), length)
            first = max(1, position - context_tokens)
            ids = windows[row, first : position + 3].tolist()
            tops.append(
                {
                    "tokens": [tokenizer.decode([i]) for i in ids],
                    "activations": [round(float(a), 4) for a in acts[row, first : position + 3]],
                    "top": position - first,
                }
            )
        nonzero = flat[flat > 0]
        counts, edges = np.histogram(nonzero, bins=30) if nonzero.size else (np.zeros(0), np.zeros(0))
        ranked = np.argsort(-logits[column])
        boards[feature] = FeatureDashboard(
            feature=feature,
            frequency=float(nonzero.size / (n * (length - 1))),
            max_activation=float(flat.max()),
            contexts=tops,
            histogram={"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
            promoted=[(tokenizer.decode([int(i)]), float(logits[column, i])) for i in ranked[:logit_tokens]],
            suppressed=[
                (tokenizer.decode([int(i)]), float(logits[column, i])) for i in ranked[::-1][:logit_tokens]
            ],
        )
    return FeatureDashboards(sae.describe(), model_name(model.model), int(n * (length - 1)), boards)
