"""Name, shape and configuration mapping between Megatron checkpoints and Hugging Face models.

Memory Mosaics (v1, v2): the HF model uses our own parameter tree under ``model.`` plus
``lm_head`` (= ``output_layer``, tied to the embedding for v1), so the mapping is a prefix.
GPT baseline: a standard ``LlamaForCausalLM``. Megatron fuses Q, K, V into ``linear_qkv`` with
rows interleaved per query group ([q of the group's heads; k; v] for each group) and the SwiGLU
``linear_fc1`` as [W1 (gate); W3 (up)]; its RoPE rotates halves (``rotate_half``), as Llama does,
so Q/K rows need no permutation.

Every conversion is checked in full: each source tensor consumed, each target parameter filled,
every shape equal to what the configuration implies.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from megatron_mosaic.training.model_kinds import KINDS, ModelKind

from .configuration_memory_mosaic import MemoryMosaicConfig

ROPE_BASE = 10000.0  # megatron_mosaic.model.gpt_baseline's rotary_base (model_builder's default)
MEGATRON_NORM_EPS = 1e-5  # TransformerConfig.layernorm_epsilon default (not a run argument)


class ConversionError(ValueError):
    """Weights and configuration do not fit together, or a feature has no mapping."""


def model_kind(args: Mapping[str, Any]) -> ModelKind:
    """The registry entry (training/model_kinds.py) of a checkpoint's ``args.model``."""
    kind = KINDS.get(args.get("model"))
    if kind is None:
        raise ConversionError(f"checkpoint args.model is {args.get('model')!r}: expected one of {', '.join(KINDS)}")
    return kind


def _required(args: Mapping[str, Any], name: str) -> Any:
    value = args.get(name)
    if value is None:
        raise ConversionError(f"checkpoint args lack {name!r}, needed to describe the model")
    return value


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def hf_config_from_args(args: Mapping[str, Any]):
    """MemoryMosaicConfig (mosaic-v1/v2) or LlamaConfig (gpt) for a checkpoint's run arguments."""
    kind = model_kind(args)
    eod = args.get("eod_token_id")
    common = dict(
        vocab_size=int(_required(args, "padded_vocab_size")),
        hidden_size=int(_required(args, "hidden_size")),
        num_hidden_layers=int(_required(args, "num_layers")),
        num_attention_heads=int(_required(args, "num_attention_heads")),
        max_position_embeddings=int(args.get("seq_length") or 2048),
        bos_token_id=None,
        eos_token_id=eod,
        pad_token_id=None,
    )
    hidden = common["hidden_size"]
    ffn = int(args.get("ffn_hidden_size") or 3 * hidden)
    if not kind.is_mosaic:
        from transformers import LlamaConfig

        groups = args.get("num_query_groups") or common["num_attention_heads"]
        return LlamaConfig(
            **common,
            intermediate_size=ffn,
            num_key_value_heads=int(groups),
            head_dim=hidden // common["num_attention_heads"],
            hidden_act="silu",
            rms_norm_eps=MEGATRON_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
        )
    version = kind.mosaic_version
    return MemoryMosaicConfig(
        **common,
        mosaic_version=version,
        ffn_hidden_size=ffn,
        persistent_memory_size=int(args.get("persistent_memory_size") or 0),
        short_term_window=int(args.get("short_term_window", 256)),
        long_term_inference_delay=int(args.get("long_term_inference_delay", 64)),
        document_masking=bool(args.get("document_masking", True)),
        eod_token_id=eod,
        key_scale_max=float(args.get("v1_key_scale_max", 5.0)),
        add_bias_linear=version == 1 and not args.get("disable_bias_linear", False),
        layernorm_epsilon=MEGATRON_NORM_EPS,
    )


def args_from_hf_config(config, base_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run arguments that rebuild the Megatron model of an HF config, on top of ``base_args``
    (the exported run's arguments, when the directory carries them). Saved at TP=PP=CP=1."""
    args = dict(base_args or {})
    model_type = getattr(config, "model_type", None)
    if model_type == "memory_mosaic":
        version = config.mosaic_version
        arch = dict(
            model=f"mosaic-v{version}",
            document_masking=config.document_masking,
            ffn_hidden_size=config.ffn_hidden_size,
            eod_token_id=config.eod_token_id,
        )
        if version == 1:
            slots = args.get("persistent_memory_size") or round(3.5 * config.hidden_size)
            arch.update(
                # 0 (the default) means round(3.5·d): keep the exported run's spelling if it agrees.
                persistent_memory_size=args.get("persistent_memory_size", 0)
                if slots == config.persistent_memory_size else config.persistent_memory_size,
                v1_key_scale_max=config.key_scale_max,
                disable_bias_linear=not config.add_bias_linear,
            )
        else:
            if config.add_bias_linear:
                raise ConversionError("config.json: add_bias_linear must be false for mosaic_version 2")
            arch.update(short_term_window=config.short_term_window,
                        long_term_inference_delay=config.long_term_inference_delay)
        eps = config.layernorm_epsilon
    elif model_type == "llama":
        _check_llama_supported(config)
        arch = dict(model="gpt", ffn_hidden_size=config.intermediate_size,
                    eod_token_id=args.get("eod_token_id", _first(config.eos_token_id)))
        eps = config.rms_norm_eps
    else:
        raise ConversionError(f"config.json: model_type {model_type!r} is not convertible (memory_mosaic or llama)")
    if abs(eps - MEGATRON_NORM_EPS) > 1e-12:
        raise ConversionError(f"config.json: norm epsilon {eps} differs from Megatron's {MEGATRON_NORM_EPS}")
    arch.update(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        padded_vocab_size=config.vocab_size,
        seq_length=args.get("seq_length") or config.max_position_embeddings,
    )
    args.update(arch)
    args.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
                num_layers_per_virtual_pipeline_stage=None, virtual_pipeline_model_parallel_size=None,
                world_size=1, data_parallel_size=1)
    return args


def _first(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


def _check_llama_supported(config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    problems = []
    if rope.get("rope_type", "default") != "default" or theta is None or float(theta) != ROPE_BASE:
        problems.append(f"RoPE {rope} (the baseline uses default RoPE, theta {ROPE_BASE:g})")
    if config.num_key_value_heads != config.num_attention_heads:
        problems.append("grouped-query attention (num_key_value_heads != num_attention_heads)")
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
        problems.append(f"head_dim {config.head_dim} != hidden_size / num_attention_heads")
    if config.attention_bias or config.mlp_bias:
        problems.append("biases")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act}")
    if config.tie_word_embeddings:
        problems.append("tied embeddings")
    if problems:
        raise ConversionError("config.json: this Llama model does not fit the GPT baseline: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def check_tensors(expected: Mapping[str, torch.Size], given: Mapping[str, Tensor], source: str, target: str) -> None:
    """Every expected name present with its shape, nothing left over; errors name each offender."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(
        f"{name}: {tuple(given[name].shape)} in {source}, {tuple(expected[name])} in {target}"
        for name in set(expected) & set(given)
        if tuple(given[name].shape) != tuple(expected[name])
    )
    problems = []
    if missing:
        problems.append(f"missing from {source}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"not used by {target}: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"shape mismatch: {wrong[:8]}{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise ConversionError(f"{source} does not match {target}: " + "; ".join(problems))


def mosaic_to_hf(tensors: Mapping[str, Tensor], version: int) -> dict[str, Tensor]:
    """Megatron MosaicModel names -> MemoryMosaicForCausalLM names."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name == "output_layer.weight":
            if version == 1:  # tied: a pipeline's last-stage copy must equal the embedding
                embedding = tensors.get("embedding.word_embeddings.weight")
                if embedding is None or not torch.equal(embedding, tensor):
                    raise ConversionError("v1 checkpoint: output_layer.weight differs from the tied embedding")
                continue
            out["lm_head.weight"] = tensor
        else:
            out[f"model.{name}"] = tensor
    return out


def hf_to_mosaic(tensors: Mapping[str, Tensor], version: int) -> dict[str, Tensor]:
    """MemoryMosaicForCausalLM names -> Megatron MosaicModel names (v1: lm_head is the embedding)."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            if version == 1:
                embedding = tensors.get("model.embedding.word_embeddings.weight")
                if embedding is not None and not torch.equal(embedding, tensor):
                    raise ConversionError("v1 model: lm_head.weight differs from the tied embedding")
                continue
            out["output_layer.weight"] = tensor
        elif name.startswith("model."):
            out[name[len("model."):]] = tensor
        else:
            out[name] = tensor  # reported as unexpected by check_tensors
    return out


_GPT_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_GPT_TO_LLAMA_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GPT_TO_LLAMA_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def gpt_to_llama(tensors: Mapping[str, Tensor], num_heads: int, num_groups: int) -> dict[str, Tensor]:
    """Megatron GPT baseline names -> LlamaForCausalLM names (QKV and fc1 split)."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name in _GPT_TO_LLAMA_TOP:
            out[_GPT_TO_LLAMA_TOP[name]] = tensor
            continue
        match = _GPT_LAYER.match(name)
        if not match:
            out[name] = tensor
            continue
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _GPT_TO_LLAMA_SIMPLE:
            out[prefix + _GPT_TO_LLAMA_SIMPLE[rest]] = tensor
        elif rest == "self_attention.linear_qkv.weight":
            q, k, v = split_qkv(tensor, num_heads, num_groups)
            out[prefix + "self_attn.q_proj.weight"] = q
            out[prefix + "self_attn.k_proj.weight"] = k
            out[prefix + "self_attn.v_proj.weight"] = v
        elif rest == "mlp.linear_fc1.weight":
            if tensor.shape[0] % 2:
                raise ConversionError(f"{name}: odd number of rows {tensor.shape[0]}, expected [W1; W3]")
            gate, up = tensor.chunk(2, dim=0)
            out[prefix + "mlp.gate_proj.weight"] = gate.clone()
            out[prefix + "mlp.up_proj.weight"] = up.clone()
        else:
            out[name] = tensor  # no Llama counterpart: reported as unexpected
    return out


def llama_to_gpt(tensors: Mapping[str, Tensor], num_heads: int, num_groups: int) -> dict[str, Tensor]:
    """LlamaForCausalLM names -> Megatron GPT baseline names (QKV and fc1 fused)."""
    top = {v: k for k, v in _GPT_TO_LLAMA_TOP.items()}
    simple = {v: k for k, v in _GPT_TO_LLAMA_SIMPLE.items()}
    layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        if name in top:
            out[top[name]] = tensor
            continue
        match = layer_re.match(name)
        if not match:
            out[name] = tensor
            continue
        layer, rest = match.groups()
        if rest in simple:
            out[f"decoder.layers.{layer}.{simple[rest]}"] = tensor
        elif rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "mlp.gate_proj.weight", "mlp.up_proj.weight"):
            pending.setdefault(layer, {})[rest] = tensor
        else:
            out[name] = tensor
    for layer, parts in pending.items():
        prefix = f"decoder.layers.{layer}."
        qkv = [parts.get(f"self_attn.{p}_proj.weight") for p in "qkv"]
        if all(t is not None for t in qkv):
            out[prefix + "self_attention.linear_qkv.weight"] = fuse_qkv(*qkv, num_heads, num_groups)
        else:
            out.update({f"model.layers.{layer}.self_attn.{p}_proj.weight": t for p, t in zip("qkv", qkv) if t is not None})
        gate, up = parts.get("mlp.gate_proj.weight"), parts.get("mlp.up_proj.weight")
        if gate is not None and up is not None:
            out[prefix + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        else:
            out.update({f"model.layers.{layer}.mlp.{n}_proj.weight": t for n, t in (("gate", gate), ("up", up)) if t is not None})
    return out


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron fused QKV (ng·(np/ng + 2)·hn, d) -> Q (np·hn, d), K (ng·hn, d), V (ng·hn, d)."""
    per_group = num_heads // num_groups
    rows, d = qkv.shape
    if num_heads % num_groups or rows % (num_groups * (per_group + 2)):
        raise ConversionError(f"linear_qkv of shape {tuple(qkv.shape)} does not fit {num_heads} heads in "
                              f"{num_groups} query groups")
    hn = rows // (num_groups * (per_group + 2))
    grouped = qkv.view(num_groups, (per_group + 2) * hn, d)
    q, k, v = grouped.split([per_group * hn, hn, hn], dim=1)
    return q.reshape(-1, d).clone(), k.reshape(-1, d).clone(), v.reshape(-1, d).clone()


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Inverse of split_qkv."""
    d = q.shape[1]
    hn = q.shape[0] // num_heads
    if q.shape[0] % num_heads or k.shape != (num_groups * hn, d) or v.shape != k.shape:
        raise ConversionError(f"q/k/v projections {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit "
                              f"{num_heads} heads in {num_groups} groups")
    per_group = num_heads // num_groups
    grouped = torch.cat(
        [q.view(num_groups, per_group * hn, d), k.view(num_groups, hn, d), v.view(num_groups, hn, d)], dim=1
    )
    return grouped.reshape(-1, d)
