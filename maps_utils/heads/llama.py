"""Llama-like families: q/k/v/o_proj (or one fused qkv_proj) under ``self_attn``, a norm before attention and one
before the MLP, or attention and MLP in parallel on one norm. What each family changes is named beside it."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .spec import Dims, fused_v, llama_like, split_kv


def _mlp_3d(block: nn.Module, x: Tensor) -> Tensor:
    """An MLP module that only takes [batch, seq, d] (Mixtral's sparse MoE block) applied to [.., d]."""
    flat = x.reshape(1, -1, x.shape[-1])  # [1, n, d]
    return block.mlp(flat).reshape(x.shape)


# --- Phi-3: one fused qkv_proj, rows [Q (n_heads*d_head) | K (n_kv*d_head) | V (n_kv*d_head)]; fused gate_up_proj
# inside the MLP module (called whole).
def _phi3_v_start(d: Dims) -> int:
    return (d.n_heads + d.n_kv_heads) * d.d_head


def _phi3_v(attn: nn.Module, d: Dims) -> Tensor:
    return fused_v(attn.qkv_proj.weight, _phi3_v_start(d), d)


def _phi3_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = getattr(attn.qkv_proj, "bias", None)
    return None if b is None else b[_phi3_v_start(d):].view(d.n_kv_heads, d.d_head)


def _phi3_q(attn: nn.Module, d: Dims) -> Tensor:
    return fused_v(attn.qkv_proj.weight, 0, d, d.n_heads)


def _phi3_k(attn: nn.Module, d: Dims) -> Tensor:
    return fused_v(attn.qkv_proj.weight, d.n_heads * d.d_head, d)


def _phi3_q_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = getattr(attn.qkv_proj, "bias", None)
    return None if b is None else b[: d.n_heads * d.d_head].view(d.n_heads, d.d_head)


def _phi3_k_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = getattr(attn.qkv_proj, "bias", None)
    return None if b is None else b[d.n_heads * d.d_head : _phi3_v_start(d)].view(d.n_kv_heads, d.d_head)


# --- StableLM: the MLP reads post_attention_layernorm, or with use_parallel_residual (no such norm) the shared
# input_layernorm output, in parallel with attention.
def _stablelm_mlp0(block: nn.Module, x: Tensor) -> Tensor:
    norm = block.post_attention_layernorm if block.post_attention_layernorm is not None else block.input_layernorm
    return block.mlp(norm(x))


# --- Granite: residual = residual + branch * residual_multiplier (both branches); the embedding is multiplied by
# embedding_multiplier in the model's forward, the logits divided by logits_scaling.
def _granite_mlp0(block: nn.Module, x: Tensor) -> Tensor:
    return block.mlp(block.post_attention_layernorm(x)) * block.residual_multiplier


def _granite_gain(block: nn.Module) -> Tensor:
    w = block.input_layernorm.weight
    return w.new_full(w.shape, block.residual_multiplier)  # [d_model]


# --- Mixtral checkpoints keep each expert's w1 (gate), w3 (up) and w2 (down) under block_sparse_moe; the model stacks
# them: gate_up_proj [experts, 2*d_ff, d] = each expert's [w1; w3], down_proj [experts, d, d_ff] = each one's w2.
_MIXTRAL_EXPERTS = re.compile(r"^(?P<layer>.*\.layers\.\d+)\.mlp\.experts\.(?P<part>gate_up_proj|down_proj)$")


def _mixtral_fused(name: str, read: Callable[[str], Tensor]) -> Tensor | None:
    m = _MIXTRAL_EXPERTS.match(name)
    if m is None:
        return None
    experts = f"{m['layer']}.block_sparse_moe.experts"
    stacked = []
    for e in itertools.count():
        try:
            if m["part"] == "down_proj":
                stacked.append(read(f"{experts}.{e}.w2.weight"))
            else:
                stacked.append(torch.cat([read(f"{experts}.{e}.w1.weight"), read(f"{experts}.{e}.w3.weight")]))
        except KeyError:
            break
    return torch.stack(stacked) if stacked else None


LLAMA = llama_like("llama", ("llama",))
QWEN2 = llama_like("qwen2", ("qwen2",))
QWEN3 = llama_like("qwen3", ("qwen3",))  # per-head q_norm / k_norm: queries and keys only
MISTRAL = llama_like("mistral", ("mistral",))
MIXTRAL = llama_like("mixtral", ("mixtral",),  # block 0's "MLP" is the router and its experts
                     mlp0=lambda block, x: _mlp_3d(block, block.post_attention_layernorm(x)),
                     checkpoint_names=((r"\.mlp\.gate\.", ".block_sparse_moe.gate."),), checkpoint_fused=_mixtral_fused)
PHI3 = llama_like("phi3", ("phi3",), v_weight=_phi3_v, v_bias=_phi3_v_bias, v_module=lambda attn: attn.qkv_proj,
                  values_from_output=lambda out, d: split_kv(out[..., _phi3_v_start(d):], d),
                  q_weight=_phi3_q, k_weight=_phi3_k, q_bias=_phi3_q_bias, k_bias=_phi3_k_bias)
STABLELM = llama_like("stablelm", ("stablelm",), mlp0=_stablelm_mlp0)
GRANITE = llama_like("granite", ("granite",), mlp0=_granite_mlp0, attn_out_gain=_granite_gain,
                     embed_multiplier=lambda model: model.model.embedding_multiplier,
                     logit_multiplier=lambda model: 1.0 / model.config.logits_scaling)
# --- Cohere: attention and MLP in parallel on one input_layernorm (no second norm); logits times logit_scale.
COHERE = llama_like("cohere", ("cohere",), parallel_attn_mlp=True,
                    mlp0=lambda block, x: block.mlp(block.input_layernorm(x)),
                    logit_multiplier=lambda model: model.logit_scale, rope_interleaved=True,
                    rope_float32=True)

FAMILIES = (LLAMA, QWEN2, QWEN3, MISTRAL, MIXTRAL, PHI3, STABLELM, GRANITE, COHERE)
