"""The guide's model class at size: a Qwen3 mixture of experts with random weights, quantized to
4 bits as mlx-lm does, built layer by layer so that it never holds its float weights whole, and
the guide's calls timed against one plain forward.

    .venv/bin/python bench/bench_moe.py --shape cpu-1b              # this CPU: about 1B parameters
    python3 bench/bench_moe.py --shape qwen3-30b-a3b --tokenizer .gpu/model   # the GPU machine

Prints and writes (--out) JSON: build time and peak memory against the weights' bytes; a plain
forward, and forwards of more rows (what a patched row costs: dense blocks batch rows almost for
free on a GPU, the experts' gathered matrix products cost per token); the experts of one block
alone; the guide's `activation_patching` over every layer's MoE block, also in each of the
engine's two layouts; a layer x position sweep of the MoE blocks; attribution over layer x expert
with the top 10 patched exactly; each as a multiple of the forward, with its peak memory. Weights
are random (timing does not depend on them); prompts are tokenised with the given tokenizer (its
ids are valid in the larger vocabulary).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen3_moe  # noqa: E402
from mlx_lm.tokenizer_utils import load as load_tokenizer  # noqa: E402

from mlxterp import InterpretableModel, expert_attribution  # noqa: E402
from mlxterp.experiments.runners import engine  # noqa: E402

SHAPES = {
    # Qwen3-30B-A3B's config.json (the guide's model)
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
                          moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                          mlp_only_layers=[], norm_topk_prob=True, vocab_size=151936, rope_theta=1e6,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # about 1B parameters, for a 2-core CPU
    "cpu-1b": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816,
                   moe_intermediate_size=512, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                   num_experts=32, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                   norm_topk_prob=True,
                   vocab_size=49152, rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-6,
                   tie_word_embeddings=False),
}
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"


def _blocks(model, x: mx.array) -> mx.array:
    for layer in model.model.layers:
        x = layer(x, "causal", None)
    return x


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def build(shape: str, dtype: mx.Dtype, bits: int | None) -> tuple[nn.Module, dict]:
    """The model, its layers made and quantized one at a time (MLX is lazy: a layer's float
    weights exist only while it is quantized)."""
    mx.reset_peak_memory()
    started = time.perf_counter()
    args = qwen3_moe.ModelArgs(model_type="qwen3_moe", **SHAPES[shape])
    model = qwen3_moe.Model(args)
    model.set_dtype(dtype)
    parts = [*model.model.layers, model.model.embed_tokens, model.lm_head, model.model.norm]
    for part in parts:
        if bits and not isinstance(part, nn.RMSNorm):
            nn.quantize(part, group_size=64, bits=bits)
        mx.eval(part.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return model, {"seconds": round(time.perf_counter() - started, 1), "weights_gib": gib(weights),
                   "peak_gib": gib(mx.get_peak_memory())}


def measure(fn, repeats: int = 3) -> dict:
    """Median seconds of `fn()` (after two warm-up runs) and the peak memory of a run.

    Two, because MLX on CUDA is still building on a call's second run: the MLP sweep of the
    30B shape took 75 s, 1.44 s, then 0.45 s steadily (H100; the first run compiles kernels)."""
    fn(), fn()
    times = []
    mx.reset_peak_memory()
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"seconds": round(sorted(times)[len(times) // 2], 4), "peak_gib": gib(mx.get_peak_memory())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-1b")
    parser.add_argument("--tokenizer", default=None,
                        help="an mlx-lm folder with a tokenizer (default: SmolLM2's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bits", type=int, default=4, help="0: not quantized")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.tokenizer:
        tokenizer = load_tokenizer(Path(args.tokenizer))
    else:
        from mlxterp.models.load import load as load_model

        tokenizer = load_model("smollm2-135m")[1]
    base, built = build(args.shape, getattr(mx, args.dtype), args.bits or None)
    model = InterpretableModel(base, tokenizer)
    report = {"shape": args.shape, "device": str(mx.default_device()), "dtype": args.dtype,
              "bits": args.bits, "build": built}
    print(json.dumps(report))
    tokens = mx.array([tokenizer.encode(CLEAN)])
    report["tokens"] = tokens.shape[1]
    report["forward"] = measure(lambda: mx.eval(base(tokens)), args.repeats)

    def timed(name: str, call) -> dict:
        """`measure(call)` into the report, with its multiple of the forward."""
        result = report[name] = measure(call, args.repeats)
        result["x_forward"] = round(result["seconds"] / report["forward"]["seconds"], 2)
        print(name, result, flush=True)
        return result

    # What bounds a sweep: one forward of as many rows as the MLP sweep patches (plus clean and
    # corrupted). Dense models batch rows almost for free; experts gathered per token may not.
    rows = len(model.tree.blocks) + 2
    for count in (2, 8, 26, rows):
        batch = mx.repeat(tokens, count, axis=0)
        timed(f"forward of {count} rows", lambda batch=batch: mx.eval(base(batch)))
    # The experts alone (mlx-lm's SwitchGLU, one block's): their cost per token routed.
    block = base.model.layers[0].mlp
    for count in (1, rows):
        x = mx.random.normal((count * tokens.shape[1], base.args.hidden_size)).astype(getattr(mx, args.dtype))
        chosen = mx.argpartition(-block.gate(x), kth=block.top_k - 1, axis=-1)[..., :block.top_k]
        mx.eval(x, chosen)
        experts = timed(f"experts of {x.shape[0]} tokens",
                        lambda x=x, chosen=chosen: mx.eval(block.switch_mlp(x, chosen)))
        experts["ms per token"] = round(1000 * experts["seconds"] / x.shape[0], 4)

    def traced():
        with model.trace(CLEAN, capture=["layers.20.mlp" if args.shape != "cpu-1b" else "layers.8.mlp"]):
            out = model.output.save()
        mx.eval(out)

    def mlp_sweep():
        return model.activation_patching(CLEAN, CORRUPTED, component="mlp")

    timed("trace", traced)
    timed("activation_patching (every MoE block)", mlp_sweep)
    timed("patching_sweep mlp, layer x position", lambda: model.patching_sweep(
        CLEAN, CORRUPTED, component="mlp", over=("layer", "position"), metric="kl", progress=False))
    # The engine's two layouts of the MLP sweep's rows, each forced (the engine chooses by its
    # measured block costs, which charge GROW's one new shape per block on its first call).
    chosen = []
    choose = engine.cheaper_strategy
    for strategy in (engine.GROW, engine.FLAT):
        engine.cheaper_strategy = lambda model, forwards, strategy=strategy: chosen.append(
            choose(model, forwards)) or strategy
        timed(f"activation_patching, {strategy} layout", mlp_sweep)
    engine.cheaper_strategy = choose
    report["layout the engine chooses"] = chosen[-1]

    # What bounds attribution: the donor's forward plus one forward and backward of the receiver.
    def forward_and_backward():
        def last_logits(embedded):
            return base.lm_head(base.model.norm(_blocks(base, embedded)))[0, -1].astype(mx.float32).sum()
        mx.eval(mx.value_and_grad(last_logits)(base.model.embed_tokens(tokens)))

    timed("forward and backward", forward_and_backward)
    moe = model.with_experts()
    answers = {"metric": "kl"}
    attribution = timed("attribution over layer x expert",
                        lambda: expert_attribution(moe, CLEAN, CORRUPTED, verify=0, **answers))
    attribution["sites"] = len(base.model.layers) * base.args.num_experts
    started = time.perf_counter()
    _, exact = expert_attribution(moe, CLEAN, CORRUPTED, verify=10, **answers)
    report["attribution + top 10 exact"] = {"seconds": round(time.perf_counter() - started, 3),
                                           "top": [[s.get("layer"), s.get("expert"), round(float(v), 2)]
                                                   for s, v in zip(exact.sites, exact.mean, strict=True)]}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
