"""mlxterp, TransformerLens and nnsight on the same device, model shape and prompts: a 30-layer MLP
sweep and a layer x position sweep of the block input, as wall time and as a multiple of each
library's own plain forward (KL at the last position; median of repeats after a warm-up).

On the lent GPU machine (scripts/gpu_prepare.sh says how the wheels and the model folder travel):
    python3 bench/peers.py --device gpu --model .gpu/model --dtype bfloat16
On a CPU, each library in its own process and with its own BLAS (an OpenBLAS preloaded for MLX
slows torch's matrix products 4x here), in an environment that has torch and the peers:
    .venv/bin/python bench/peers.py --device cpu --only mlxterp
    python bench/peers.py --device cpu --only nnsight transformer_lens

The model is SmolLM2-135M's shape (30 layers, d 576, 9 heads / 3 key-value heads, vocabulary
49,152) with random weights and the real tokenizer, in every library: time does not depend on
the weights' values. Each peer runs in its fastest documented form: TransformerLens one hooked
forward per site (its `patching` module's procedure, `get_act_patch_resid_pre` for layer x
position); nnsight every patch as an invoke of one trace, so that all of them run as one batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_patching import PAIRS  # noqa: E402
from random_model import bundled_folder, random_model  # noqa: E402

MLP, POSITION = "mlp x layer", "input x layer x position"


def median_time(run, repeats: int, sync=lambda: None) -> float:
    """Median seconds of `run` (then `sync`), after one warm-up call."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mlxterp_rows(folder: str, device: str, dtype: str, repeats: int):
    import mlx.core as mx

    from mlxterp import InterpretableModel

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    base, tokenizer = random_model(folder, dtype)
    model = InterpretableModel(base, tokenizer)
    options = {MLP: dict(component="mlp", over="layer"),
               POSITION: dict(component="input", over=("layer", "position"))}
    for pair, (clean, corrupted) in PAIRS.items():
        ids = mx.array([tokenizer.encode(clean)])
        forward = median_time(lambda ids=ids: mx.eval(base(ids)), 10)
        for sweep in (MLP, POSITION):
            def run(sweep=sweep, clean=clean, corrupted=corrupted):
                model.patching_sweep(clean, corrupted, metric="kl", progress=False, **options[sweep])
            yield "mlxterp", pair, sweep, forward, median_time(run, repeats)


def torch_model(folder: str, device: str, dtype: str):
    """A transformers Llama of the folder's config with random weights, and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = json.loads((Path(folder) / "config.json").read_text())
    hf_config = LlamaConfig(**{key: config[key] for key in (
        "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "vocab_size",
        "tie_word_embeddings", "max_position_embeddings")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config).to(_torch_device(device), getattr(torch, dtype)).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"))
    return model, tokenizer, hf_config


def _torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "gpu" else (lambda: None)


def kl_last(logits, clean_logits):
    """KL(clean || patched) at the last position, per row, in float32."""
    import torch

    reference = torch.log_softmax(clean_logits[:, -1].float(), -1)
    patched = torch.log_softmax(logits[:, -1].float(), -1)
    return (reference.exp() * (reference - patched)).sum(-1)


def transformer_lens_rows(folder: str, device: str, dtype: str, repeats: int):
    import torch
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tokenizer, hf_config = torch_model(folder, device, dtype)
    with tempfile.TemporaryDirectory() as local:  # the bridge reads the config from a folder
        hf_config.save_pretrained(local)
        tokenizer.save_pretrained(local)
        bridge = TransformerBridge.boot_transformers(local, hf_model=hf_model, tokenizer=tokenizer,
                                                     device=_torch_device(device),
                                                     dtype=getattr(torch, dtype))
    bridge.eval()
    for pair, (clean, corrupted) in PAIRS.items():
        clean_ids, corrupted_ids = (torch.tensor([tokenizer.encode(text)], device=_torch_device(device))
                                    for text in (clean, corrupted))

        def mlp_sweep(clean_ids=clean_ids, corrupted_ids=corrupted_ids):
            clean_logits, cache = bridge.run_with_cache(clean_ids)
            values = []
            for layer in range(hf_config.num_hidden_layers):
                name = f"blocks.{layer}.hook_mlp_out"

                def patch(activation, hook, name=name):
                    return cache[name]

                logits = bridge.run_with_hooks(corrupted_ids, fwd_hooks=[(name, patch)])
                values.append(kl_last(logits, clean_logits))
            return torch.cat(values).cpu()

        def position_sweep(clean_ids=clean_ids, corrupted_ids=corrupted_ids):
            clean_logits, cache = bridge.run_with_cache(clean_ids)
            return patching.get_act_patch_resid_pre(
                bridge, corrupted_ids, cache, lambda logits: kl_last(logits, clean_logits)[0]).cpu()

        with torch.no_grad():
            forward = median_time(lambda ids=clean_ids: bridge(ids), 10, _sync(device))
            for sweep, run in ((MLP, mlp_sweep), (POSITION, position_sweep)):
                yield "TransformerLens", pair, sweep, forward, median_time(run, repeats, _sync(device))


def nnsight_rows(folder: str, device: str, dtype: str, repeats: int):
    import torch
    from nnsight import LanguageModel

    hf_model, tokenizer, hf_config = torch_model(folder, device, dtype)
    lm = LanguageModel(hf_model, tokenizer=tokenizer)
    layers = hf_config.num_hidden_layers

    def mlp_output(layer):
        return lm.model.layers[layer].mlp

    def block_input(layer):  # the block input is the previous block's output
        return lm.model.layers[layer - 1] if layer else lm.model.embed_tokens

    def sweep(sites, envoy_of, clean_ids, corrupted_ids):
        """KL of every (layer, position or None) patch, each an invoke of one trace."""
        # Containers made outside the trace: nnsight runs each invoke's body on its own, and
        # names it binds inside a function do not reach the next invoke.
        donors, clean_logits, patched = [], [], []
        with lm.trace() as tracer:
            with tracer.invoke(clean_ids):
                donors.extend(envoy_of(layer).output.clone().save() for layer in range(layers))
                clean_logits.append(lm.lm_head.output.save())
            for layer, position in sites:
                with tracer.invoke(corrupted_ids):
                    target = envoy_of(layer).output
                    if position is None:
                        target[:] = donors[layer]
                    else:
                        target[:, position] = donors[layer][:, position]
                    patched.append(lm.lm_head.output.save())
        return kl_last(torch.cat(patched), clean_logits[0]).cpu()

    for pair, (clean, corrupted) in PAIRS.items():
        clean_ids, corrupted_ids = (torch.tensor([tokenizer.encode(text)], device=_torch_device(device))
                                    for text in (clean, corrupted))
        mlp_sites = [(layer, None) for layer in range(layers)]
        position_sites = [(layer, p) for layer in range(layers) for p in range(clean_ids.shape[1])]
        with torch.no_grad():
            forward = median_time(lambda ids=clean_ids: hf_model(ids), 10, _sync(device))
            for name, sites, envoy_of in ((MLP, mlp_sites, mlp_output),
                                          (POSITION, position_sites, block_input)):
                def run(sites=sites, envoy_of=envoy_of, clean_ids=clean_ids, corrupted_ids=corrupted_ids):
                    return sweep(sites, envoy_of, clean_ids, corrupted_ids)
                yield "nnsight", pair, name, forward, median_time(run, repeats, _sync(device))


RUNNERS = {"mlxterp": mlxterp_rows, "transformer_lens": transformer_lens_rows, "nnsight": nnsight_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="folder with config.json and tokenizer.json "
                        "(default: the bundled SmolLM2's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(RUNNERS), choices=list(RUNNERS))
    args = parser.parse_args()
    folder = args.model or str(bundled_folder("smollm2-135m"))
    print(f"{args.device}, {args.dtype}, SmolLM2-135M shape, random weights\n")
    print("| library | pair | sweep | forward ms | sweep ms | x own forward |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.only:
        try:
            for library, pair, sweep, forward, seconds in RUNNERS[name](folder, args.device, args.dtype,
                                                                         args.repeats):
                print(f"| {library} | {pair} | {sweep} | {forward * 1e3:.1f} | {seconds * 1e3:.1f} | "
                      f"{seconds / forward:.1f}x |", flush=True)
        except Exception:  # printed, not hidden: one peer failing must not lose the others' rows
            print(f"| {name} | failed: {traceback.format_exc(limit=-4)!r} |", flush=True)


if __name__ == "__main__":
    main()
