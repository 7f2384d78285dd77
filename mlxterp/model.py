"""`InterpretableModel`: the wrapper users hold. It names modules, runs traces and hands analyses
to the experiments layer; it computes nothing itself."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxterp.errors import InputTypeError, LayerIndexError, TraceError, UnknownModuleError
from mlxterp.experiments.analyses import (
    attribution,
    causal_tracing,
    circuits,
    experts,
    generation,
    heads,
    lenses,
    patching,
    saes,
    steering,
)
from mlxterp.experiments.pipeline.options import SweepOptions, check_names, option_names
from mlxterp.tracing.inputs import Inputs, check_text, to_token_array
from mlxterp.tracing.intervening import Intervening
from mlxterp.tracing.names import OUTPUT_KEY, ModuleTree
from mlxterp.tracing.trace import Intervention, Trace


def _check_options(options: Mapping, *functions) -> None:
    """Refuse options that none of `functions` takes (their keyword parameters, and the shared
    `SweepOptions` where they take one), naming the closest."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    known = set()
    for fn in functions:
        parameters = inspect.signature(fn).parameters
        known |= {name for name, p in parameters.items() if p.kind in named}
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            known |= option_names()
    check_names(options, known - {"model", "clean", "corrupted"})  # given positionally


class InterpretableModel:
    """Wrap any MLX module to read and change what its modules compute.

    `model.model` is the wrapped module, so full module names read `model.model.layers.3.mlp`
    for an mlx-lm model; any dot-boundary suffix (`layers.3.mlp`) works as a key.

    Example:
        >>> base, tokenizer = mlxterp.load("smollm2-135m")
        >>> model = InterpretableModel(base, tokenizer=tokenizer)
        >>> with model.trace("The capital of France is"):
        ...     logits = model.output.save()
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        if not isinstance(model, nn.Module):
            raise InputTypeError(
                f"InterpretableModel wraps an mlx.nn.Module; got {type(model).__name__}."
            )
        if tokenizer is not None and not all(callable(getattr(tokenizer, f, None))
                                             for f in ("encode", "decode")):
            raise InputTypeError(
                f"the tokenizer must have encode() and decode() (e.g. the one mlxterp.load "
                f"returns); got {type(tokenizer).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.tree = ModuleTree(model)  # every module by name, and the block list
        self._active: Trace | Intervening | None = None  # probes go on one at a time
        # Rows of the input embedding: token ids must stay below it.
        rows = [m.weight.shape[0] for m in self.tree.modules.values()
                if isinstance(m, nn.Embedding | nn.QuantizedEmbedding)]
        self._embedding_rows = max(rows) if rows else None

    # -- running -------------------------------------------------------------------------------

    def __call__(self, inputs: Inputs, *args, **kwargs):
        """Run the wrapped model on `inputs`; with no trace active this is the bare model."""
        return self.model(self._tokens(inputs), *args, **kwargs)

    def trace(
        self,
        inputs: Inputs,
        interventions: Mapping[str, Intervention] | None = None,
        capture: Iterable[str] | None = None,
        capture_attention: bool = False,
    ) -> Trace:
        """A forward pass to read activations from and intervene on, as a context manager.

        Args:
            inputs: a string, a list of strings of equal token length, token ids (a list, a
                list of lists, or an mx.array).
            interventions: `{key: fn}`; `fn(activation) -> activation` replaces the output of
                the module `key` (or its input, for keys ending in `:input`).
            capture: record only these keys (faster, and nothing else is kept alive); by
                default every module's input and output is recorded.
            capture_attention: also record every attention module's probabilities
                (batch, heads, queries, keys) as `"layers.3.self_attn:pattern"`; a key such as
                that in `capture` records one layer's.

        Raises:
            InputTypeError: inputs or keys of the wrong type.
            InputError: inputs that cannot run (empty, of different token lengths).
            UnknownModuleError: a key that names no module, or several.
            NotReachedError: an intervention whose module never ran.
            TraceError: a trace inside another.

        Example:
            >>> with model.trace(corrupted, interventions={"layers.10.mlp": iv.zero_out}):
            ...     logits = model.output.save()
            >>> with model.trace(prompt, capture_attention=True) as trace:
            ...     pattern = trace.activations["layers.3.self_attn:pattern"]
        """
        if not isinstance(capture_attention, bool):
            raise InputTypeError(f"capture_attention is True or False; got {capture_attention!r}.")
        return Trace(self.model, self.tree, self._tokens(inputs), interventions, capture,
                     capture_attention, on_enter=self._begin, on_exit=self._end)

    def intervening(self, interventions: Mapping[str, Intervention] | None) -> Intervening:
        """Interventions installed for every call of the model inside a `with` block, with the
        same keys and checks as `trace`; positions in `iv.at_positions` are absolute, counted
        over every forward pass since it was made (as in generation, which uses it).

        Raises:
            UnknownModuleError: a key that names no module, or several.
            TraceError: interventions installed inside a trace or other installed interventions.

        Example:
            >>> with model.intervening({"layers.6": iv.add_vector(1.0 * v)}):
            ...     logits = model("I went to the")
        """
        return Intervening(self.tree, interventions, on_enter=self._begin, on_exit=self._end)

    def _begin(self, run: Trace | Intervening) -> None:
        # Two sets of probes on one module would remove each other's on exit.
        if self._active is not None:
            outer = ("a trace is" if isinstance(self._active, Trace)
                     else "interventions installed with model.intervening (or model.generate) are")
            raise TraceError(
                f"{outer} already active on this model; traces and installed interventions "
                "cannot be nested. Finish the outer `with` block first, or pass every "
                "intervention to one of them."
            )
        self._active = run

    def _end(self) -> None:
        self._active = None

    def _tokens(self, inputs: Inputs) -> mx.array:
        return to_token_array(inputs, self.tokenizer, self._embedding_rows)

    def _current_trace(self, what: str) -> Trace:
        if not isinstance(self._active, Trace):
            raise TraceError(f"{what} is only available inside a `with model.trace(...)` block.")
        return self._active

    # -- reading -------------------------------------------------------------------------------

    @property
    def output(self) -> ActivationProxy:
        """The model's output in the current trace: `model.output.save()`."""
        return ActivationProxy(self, OUTPUT_KEY)

    @property
    def layers(self) -> LayerList:
        """The model's blocks, in order; each has `.output` and its sub-modules (`.mlp`, ...)."""
        return LayerList(self)

    def module_names(self) -> list[str]:
        """Full names of every module, in tree order.

        It raises nothing.
        """
        return list(self.tree.modules)

    def resolve(self, key: str) -> str:
        """The full module name a (short) key stands for, e.g. `layers.3.mlp`.

        Raises:
            UnknownModuleError: a key that names no module, or several (with the closest names).
        """
        return self.tree.resolve(key)

    # -- analyses (delegates to the experiments layer) ----------------------------------------

    def activation_patching(self, clean_text: str, corrupted_text: str,
                            component: str = SweepOptions.component, layers=SweepOptions.layers,
                            metric=SweepOptions.metric, plot: bool = False, **options) -> dict[int, float]:
        """`{layer: recovery %}`; see `mlxterp.experiments.analyses.patching.activation_patching`.

        Raises:
            InputError: see `patching_sweep`, which lists each case.

        Example:
            >>> model.activation_patching("Paris is the capital of France",
            ...                           "London is the capital of France", component="mlp")
        """
        _check_options(options, patching.activation_patching, patching.patching_sweep)
        return patching.activation_patching(self, clean_text, corrupted_text, component, layers, metric,
                                   plot, **options)

    def patching_sweep(self, clean=None, corrupted=None, options: SweepOptions | None = None, **keywords):
        """A `PatchingResult`; see `mlxterp.experiments.analyses.patching.patching_sweep`.

        Raises:
            InputTypeError: an unknown option (naming the closest), or an argument of the wrong
                type.
            InputError: see `patching_sweep`, which lists each case.

        Example:
            >>> model.patching_sweep(clean, corrupted, component="input", over=("layer", "position"))
            >>> model.patching_sweep(pairs=ioi_pairs(64), metric="logit_diff")
        """
        _check_options(keywords, patching.patching_sweep)
        return patching.patching_sweep(self, clean, corrupted, options, **keywords)

    def attribution_patching(self, clean=None, corrupted=None, options: SweepOptions | None = None,
                             **keywords):
        """A `PatchingResult` of estimates from gradients; see
        `mlxterp.experiments.analyses.attribution.attribution_patching`.

        Raises:
            InputError: see `attribution_patching`, which lists each case.

        Example:
            >>> model.attribution_patching(clean, corrupted, component="input",
            ...                            over=("layer", "position"), metric="kl")
        """
        _check_options(keywords, attribution.attribution_patching)
        return attribution.attribution_patching(self, clean, corrupted, options, **keywords)

    def edge_attribution(self, clean=None, corrupted=None, options: SweepOptions | None = None,
                         **keywords):
        """Every edge's estimated recovery (EAP, EAP-IG), a `PatchingResult` of edges; see
        `mlxterp.experiments.analyses.circuits.edge_attribution`.

        Raises:
            InputError: see `edge_attribution`, which lists each case.

        Example:
            >>> model.edge_attribution(pairs=pairs, metric="logit_diff", method="eap-ig", steps=8)
        """
        _check_options(keywords, circuits.edge_attribution)
        return circuits.edge_attribution(self, clean, corrupted, options, **keywords)

    def edge_patching(self, clean=None, corrupted=None, options: SweepOptions | None = None,
                      **keywords):
        """The exact recovery of patching each given edge alone (path patching); see
        `mlxterp.experiments.analyses.circuits.edge_patching`.

        Raises:
            InputError: see `edge_patching`, which lists each case.

        Example:
            >>> model.edge_patching(clean, corrupted, edges=["L0.mlp->logits"], metric="kl")
        """
        _check_options(keywords, circuits.edge_patching)
        return circuits.edge_patching(self, clean, corrupted, options, **keywords)

    def faithfulness_curve(self, scores, sizes=None, options: SweepOptions | None = None, **keywords):
        """The faithfulness of the top-n circuits of edge scores; see
        `mlxterp.experiments.analyses.circuits.faithfulness_curve`.

        Raises:
            InputError: see `faithfulness_curve`, which lists each case.

        Example:
            >>> model.faithfulness_curve(scores, sizes=[10, 100, 1000]).mean
        """
        _check_options(keywords, circuits.faithfulness_curve)
        return circuits.faithfulness_curve(self, scores, sizes, options, **keywords)

    def causal_trace(self, prompt: str | None = None, subject=None, options: SweepOptions | None = None,
                     **keywords):
        """Causal tracing: the indirect effect of restoring each (layer, token) state of the
        prompt with its subject noised; see `mlxterp.experiments.analyses.causal_tracing.causal_trace`.

        Raises:
            InputError: see `causal_trace`, which lists each case.

        Example:
            >>> model.causal_trace("The Eiffel Tower is located in the city of",
            ...                    subject="The Eiffel Tower", kind="mlp").plot()
        """
        _check_options(keywords, causal_tracing.causal_trace)
        return causal_tracing.causal_trace(self, prompt, subject, options, **keywords)

    def with_sae(self, sae) -> InterpretableModel:
        """This model with `sae` spliced at its site: a new model sharing every weight, with the
        SAE's latents and error term as modules (`layers.8.sae.features`, `layers.8.sae.error`);
        its output is bit for bit this model's until they are changed. See `saes.with_sae`.

        Raises:
            SAEError: an SAE whose width, dtype or model does not match, or a model that has one.
            UnknownModuleError: a site this model does not have.
            NotReachedError: a site the model never calls.

        Example:
            >>> spliced = model.with_sae(load_saelens("out/smollm2-l8-topk"))
        """
        return saes.with_sae(self, sae)

    def with_experts(self) -> InterpretableModel:
        """This model with every mixture-of-experts block's routing weights and per-expert
        contributions as modules (`layers.3.mlp.routing`, `layers.3.mlp.experts`): a new model
        sharing every weight, bit for bit this model until routing or an expert is changed.
        See `experts.with_experts`.

        Raises:
            SiteError: a model without MoE blocks, or with blocks of a family mlxterp cannot route.

        Example:
            >>> moe = model.with_experts()
        """
        return experts.with_experts(self)

    def logit_lens(self, prompt: Inputs, **options) -> lenses.LensResult:
        """The model's prediction after each block at each position: a `LensResult`; see
        `mlxterp.experiments.analyses.lenses.logit_lens` (a tuned lens: `lens=TunedLens.load(...)`).

        Raises:
            LensError: see `logit_lens`, which lists each case.

        Example:
            >>> model.logit_lens("The Eiffel Tower is in the city of", target=" Paris").plot()
        """
        _check_options(options, lenses.logit_lens)
        return lenses.logit_lens(self, prompt, **options)

    def detect_heads(self, tokens: Inputs | None = None, **options) -> heads.HeadScores:
        """Previous-token, duplicate-token and induction scores of every attention head: a
        `HeadScores`; see `mlxterp.experiments.analyses.heads.detect_heads`.

        Raises:
            InputError: see `detect_heads`, which lists each case.

        Example:
            >>> model.detect_heads().top("induction", 3)
        """
        _check_options(options, heads.detect_heads)
        return heads.detect_heads(self, tokens, **options)

    def generate(self, prompt: str | Sequence[int], **options) -> generation.Generation | Iterator:
        """Text generated by mlx-lm's loop with interventions applied at every step; see
        `mlxterp.experiments.analyses.generation.generate`.

        Raises:
            GenerationError: see `generate`, which lists each case.

        Example:
            >>> model.generate("I went to the", max_tokens=20, interventions=v.interventions(1.0)).text
        """
        _check_options(options, generation.generate)
        return generation.generate(self, prompt, **options)

    def steering_vector(self, positive, negative, layer: int, **options) -> steering.SteeringVector:
        """The mean activation difference between paired prompts; see
        `mlxterp.experiments.analyses.steering.steering_vector`.

        Raises:
            SteeringVectorError: see `steering_vector`, which lists each case.

        Example:
            >>> v = model.steering_vector(["I love weddings"], ["I love meetings"], layer=6)
        """
        _check_options(options, steering.steering_vector)
        return steering.steering_vector(self, positive, negative, layer, **options)

    # -- tokenizer helpers ---------------------------------------------------------------------

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise TraceError("this model was wrapped without a tokenizer; pass tokenizer=...")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, as the model sees it (with BOS where the model adds one).

        Raises:
            InputTypeError: text that is no string.
            TraceError: a model wrapped without a tokenizer.
        """
        if not isinstance(text, str):
            raise InputTypeError(f"encode takes a string; got {type(text).__name__} {text!r}.")
        return list(self._require_tokenizer().encode(check_text(text)))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids.

        Raises:
            TraceError: a model wrapped without a tokenizer.
        """
        return self._require_tokenizer().decode(list(ids))

    def token_to_str(self, token_id: int) -> str:
        """The text of one token.

        Raises:
            TraceError: a model wrapped without a tokenizer.
        """
        return self.decode([token_id])

    def to_str_tokens(self, text_or_ids: str | Sequence[int]) -> list[str]:
        """Each token of a text (or id list) as its own string.

        Raises:
            InputTypeError: text that is no string.
            TraceError: a model wrapped without a tokenizer.
        """
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        return [self.token_to_str(i) for i in ids]

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding (the logit width of a language model)."""
        rows = self._embedding_rows
        return rows if rows is not None else len(self._require_tokenizer().vocab)


class ActivationProxy:
    """An activation by name, read from the current trace with `.save()`."""

    def __init__(self, owner: InterpretableModel, key: str):
        self._owner, self._key = owner, key

    def save(self) -> mx.array:
        """The activation in the current trace (an mx.array that stays valid after the block)."""
        return self._owner._current_trace(f"{self._key}.save()").activations[self._key]

    def __repr__(self) -> str:
        return f"ActivationProxy({self._key!r})"


class ModuleProxy:
    """A module by name: `.output`, `.input` and its sub-modules as attributes."""

    def __init__(self, owner: InterpretableModel, name: str):
        self._owner, self.name = owner, name

    @property
    def output(self) -> ActivationProxy:
        return ActivationProxy(self._owner, self.name)

    @property
    def input(self) -> ActivationProxy:
        return ActivationProxy(self._owner, f"{self.name}:input")

    def __getattr__(self, attr: str) -> ModuleProxy:
        if attr.startswith("_"):
            raise AttributeError(attr)
        child = f"{self.name}.{attr}"
        if child not in self._owner.tree.modules:
            children = sorted({n[len(self.name) + 1:].split(".")[0]
                               for n in self._owner.tree.modules if n.startswith(self.name + ".")})
            raise UnknownModuleError(
                f"{self.name!r} has no sub-module {attr!r}; its sub-modules are {children}."
            )
        return ModuleProxy(self._owner, child)

    def __repr__(self) -> str:
        return f"ModuleProxy({self.name!r})"


class LayerList(Sequence):
    """The model's blocks as proxies: `model.layers[3].mlp.output.save()`."""

    def __init__(self, owner: InterpretableModel):
        self._owner = owner
        self._names = owner.tree.blocks

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [ModuleProxy(self._owner, n) for n in self._names[index]]
        if not isinstance(index, int | np.integer):
            raise InputTypeError(f"layers are indexed by int or slice; got {type(index).__name__}.")
        if not -len(self) <= index < len(self):
            raise LayerIndexError(
                f"layer {index} is out of range: the model has {len(self)} layers "
                f"(0 to {len(self) - 1})."
            )
        return ModuleProxy(self._owner, self._names[index])
