"""Convert a GGUF file into an mlx-lm model folder: config.json, model.safetensors, tokenizer files.

llama.cpp's files differ from the Hugging Face checkpoints mlx-lm expects in a few ways that do
not show in a plausible next token but do show in the logits; each is undone here:

- llama models: the converter permutes the rows of `attn_q` and `attn_k` per head (rotary pairs
  interleaved); `_unpermute_rotary_rows` reverses it.
- gemma3: RMSNorm weights are stored as `1 + w`; mlx-lm adds the 1 itself.
- quantized blocks are dequantized with the `gguf` package in float32 (it reads every type,
  including Q5_0 and the K-quants that `mx.load` cannot), or, with `quantized=True`, repacked
  exactly as MLX affine quantized weights where the GGUF block maps onto them.

The tokenizer is rebuilt from the file's metadata with transformers' GGUF tokenizer converter,
which needs no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, dequantize

from mlxterp.errors import ModelLoadError


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture maps onto an mlx-lm model type."""

    config: Callable[[dict], dict]
    tensor_names: dict[str, str]  # GGUF name inside a block -> mlx-lm name inside a layer
    fix_weight: Callable[[str, np.ndarray, dict], np.ndarray]


def _llama_config(meta: dict) -> dict:
    heads = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": meta["llama.block_count"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.attention.key_length", hidden // heads),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": meta.get("llama.context_length", 2048),
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": True,  # overwritten from the tensor list
    }


def _unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q/k projections (GGUF -> HF order)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _llama_fix_weight(name: str, weight: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("self_attn.q_proj.weight"):
        return _unpermute_rotary_rows(weight, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return _unpermute_rotary_rows(weight, config["num_key_value_heads"])
    return weight


def _gemma3_config(meta: dict) -> dict:
    return {
        "model_type": "gemma3_text",
        "hidden_size": meta["gemma3.embedding_length"],
        "num_hidden_layers": meta["gemma3.block_count"],
        "intermediate_size": meta["gemma3.feed_forward_length"],
        "num_attention_heads": meta["gemma3.attention.head_count"],
        "num_key_value_heads": meta["gemma3.attention.head_count_kv"],
        "head_dim": meta["gemma3.attention.key_length"],
        "rms_norm_eps": meta["gemma3.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta["gemma3.rope.freq_base"],
        "sliding_window": meta["gemma3.attention.sliding_window"],
        "max_position_embeddings": meta["gemma3.context_length"],
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        # Gemma 3 settings that the GGUF does not carry.
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
    }


def _gemma3_fix_weight(name: str, weight: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("norm.weight"):
        return weight - 1.0
    return weight


_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_llama_config, _LLAMA_BLOCK, _llama_fix_weight),
    "gemma3": Architecture(
        _gemma3_config,
        {
            **_LLAMA_BLOCK,
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
        },
        _gemma3_fix_weight,
    ),
}

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")

# GGUF block types that are exactly MLX affine quantization with group size 32:
# type -> bits. Every other type is dequantized.
_EXACT_AFFINE_BITS = {
    GGMLQuantizationType.Q4_0: 4,
    GGMLQuantizationType.Q4_1: 4,
    GGMLQuantizationType.Q8_0: 8,
}


def read_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file, turning the reader's low-level failures into a clear error."""
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}). "
            "It may be truncated or corrupt: download or assemble it again."
        ) from err


def _mlx_name(gguf_name: str, arch: Architecture) -> str:
    match = _BLOCK_TENSOR.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in arch.tensor_names:
            raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")
        return f"model.layers.{layer}.{arch.tensor_names[part]}.{kind}"
    stem, _, kind = gguf_name.rpartition(".")
    if stem not in _TOP_LEVEL:
        raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")
    return f"{_TOP_LEVEL[stem]}.{kind}"


def _affine_blocks(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer levels, scales and biases (w = scale * q + bias) of a Q4_0/Q4_1/Q8_0 tensor."""
    kind = tensor.tensor_type
    raw = np.asarray(tensor.data)
    rows = raw.shape[0]
    block_bytes = {GGMLQuantizationType.Q8_0: 34, GGMLQuantizationType.Q4_0: 18,
                   GGMLQuantizationType.Q4_1: 20}[kind]
    blocks = raw.reshape(rows, -1, block_bytes)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == GGMLQuantizationType.Q8_0:
        levels = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
        bias = -128.0 * scale
    else:
        offset = 4 if kind == GGMLQuantizationType.Q4_1 else 2
        packed = blocks[..., offset:]
        # Low nibbles are elements 0..15 of the block, high nibbles 16..31.
        levels = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
        if kind == GGMLQuantizationType.Q4_1:
            bias = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        else:
            bias = -8.0 * scale
    return levels.reshape(rows, -1).astype(np.uint32), scale, bias


def _pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer levels into MLX's uint32 words, lowest bits first."""
    per_word = 32 // bits
    rows, cols = levels.shape
    grouped = levels.reshape(rows, cols // per_word, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint32)


def _convert_tensors(
    reader: GGUFReader, arch: Architecture, config: dict, dtype: mx.Dtype, quantized: bool
) -> tuple[dict[str, mx.array], dict]:
    """All weights as mlx arrays keyed by mlx-lm names, plus the `quantization` config entry."""
    weights: dict[str, mx.array] = {}
    quantization: dict = {}
    for tensor in reader.tensors:
        name = _mlx_name(tensor.name, arch)
        bits = _EXACT_AFFINE_BITS.get(tensor.tensor_type)
        if quantized and bits is not None:
            # Rows are independent quantization groups, so the row fixes (llama's un-permute)
            # apply to levels, scales and biases alike.
            levels, scale, bias = (arch.fix_weight(name, part, config)
                                   for part in _affine_blocks(tensor))
            prefix = name.removesuffix(".weight")
            weights[name] = mx.array(_pack_levels(levels, bits))
            weights[f"{prefix}.scales"] = mx.array(scale).astype(dtype)
            weights[f"{prefix}.biases"] = mx.array(bias).astype(dtype)
            quantization[prefix] = {"group_size": 32, "bits": bits}
            continue
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        weights[name] = mx.array(arch.fix_weight(name, values, config)).astype(dtype)
    return weights, quantization


_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _save_tokenizer(meta: dict, out_dir: Path) -> None:
    """Rebuild the tokenizer from GGUF metadata (no torch needed) and save it as HF files."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    tokenizer_dict, tokenizer_config = (
        {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
         if f"tokenizer.{key}" in meta}
        for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"],
                        GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    )
    # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = meta["tokenizer.ggml.tokens"]
    for special, key in _SPECIAL_TOKEN_IDS.items():
        if key in meta:
            tokenizer_config[special] = tokens[meta[key]]
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config).save_pretrained(out_dir)


def convert_gguf(path: Path, out_dir: Path, dtype: mx.Dtype, quantized: bool) -> None:
    """Write an mlx-lm model folder for the GGUF file at `path` into `out_dir`.

    Example:
        >>> convert_gguf(Path("SmolLM2.gguf"), Path("/tmp/smollm2"), mx.float32, False)
    """
    reader = read_gguf(path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path} is a GGUF of architecture {arch_name!r}; mlxterp converts GGUF files of "
            f"architectures {sorted(ARCHITECTURES)}. For other models, use an mlx-lm model "
            "folder or a hub id (`org/name`)."
        )
    arch = ARCHITECTURES[arch_name]
    config = arch.config(meta)
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    config["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    weights, quantization = _convert_tensors(reader, arch, config, dtype, quantized)
    if quantization:
        config["quantization"] = {"group_size": 32, "bits": 4, **quantization}
    out_dir.mkdir(parents=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer(meta, out_dir)
