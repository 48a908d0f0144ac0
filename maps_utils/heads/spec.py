"""The adapter type: :class:`ArchSpec`, one per architecture family, and the accessors families share.

Conventions (row vectors, as in the paper): a residual vector ``x`` of shape ``[d_model]`` gives head ``h``'s value
``v_h = x @ W_V[h] + b_V[h]`` (``[d_head]``); after attention mixes values into ``z_h``, the head writes
``z_h @ W_O[h]`` (``[d_model]``) and the attention block's output is ``sum_h z_h @ W_O[h] + b_O``. Under
grouped-query attention the query heads of one KV group share ``W_V``/``b_V`` (group ``h // (n_heads //
n_kv_heads)``) and keep their own ``W_O``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Dims:
    """Head geometry read from the config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int


def _none(_) -> None:
    return None


def _not_fused(name: str, read: Callable[[str], Tensor]) -> None:
    return None


# ---- the QK side's defaults (q_proj / k_proj, norms named q_norm / k_norm or q_layernorm / k_layernorm) -----------
def _heads(weight: Tensor, n: int, d: Dims) -> Tensor:
    """``[n, d_model, d_head]`` from an [n*d_head, d_model] Linear weight."""
    return weight.view(n, d.d_head, d.d_model).transpose(1, 2)


def linear_q(attn: nn.Module, d: Dims) -> Tensor:
    return _heads(attn.q_proj.weight, d.n_heads, d)


def linear_k(attn: nn.Module, d: Dims) -> Tensor:
    return _heads(attn.k_proj.weight, d.n_kv_heads, d)


def linear_q_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = getattr(attn.q_proj, "bias", None)
    return None if b is None else b.view(d.n_heads, d.d_head)


def linear_k_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = getattr(attn.k_proj, "bias", None)
    return None if b is None else b.view(d.n_kv_heads, d.d_head)


def module_qk_norms(attn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The attention's own query and key norms, called on ``[n, heads, d_head]`` (per head: Qwen3, Gemma-3, Cohere;
    per last dimension: Phi; one LayerNorm per head along dim 1: StableLM), or None."""
    for q, k in (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm")):
        qn, kn = getattr(attn, q, None), getattr(attn, k, None)
        if isinstance(qn, nn.Module) and isinstance(kn, nn.Module):
            return qn, kn
    return None


def cos_sin(pair) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[n, r]`` from a rotary module's ``[1, n, r]`` output."""
    cos, sin = pair
    return cos[0], sin[0]


def model_rope(model: nn.Module, layer: int, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """The model's own rotary embedding (``model.model.rotary_emb``) at ``positions`` ``[n]``."""
    return cos_sin(model.model.rotary_emb(like, positions[None]))


@dataclass(frozen=True)
class ArchSpec:
    """Accessors for one architecture family (all shapes in the comments)."""

    family: str
    model_types: tuple[str, ...]
    parallel_attn_mlp: bool
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    attn: Callable[[nn.Module], nn.Module]  # block -> attention module (input: normalised residual)
    v_weight: Callable[[nn.Module, Dims], Tensor]  # attn -> [n_kv, d_model, d_head]
    v_bias: Callable[[nn.Module, Dims], Tensor | None]  # attn -> [n_kv, d_head]
    out_proj: Callable[[nn.Module], nn.Module]  # attn -> output projection; its input is z [.., n_heads*d_head]
    o_weight: Callable[[nn.Module, Dims], Tensor]  # attn -> [n_heads, d_head, d_model]
    v_module: Callable[[nn.Module], nn.Module]  # attn -> module whose output holds the value vectors
    values_from_output: Callable[[Tensor, Dims], Tensor]  # v_module output -> [.., n_kv, d_head]
    mlp0: Callable[[nn.Module, Tensor], Tensor]  # (block 0, x) -> MLP branch without the residual
    embed: Callable[[nn.Module], nn.Embedding] = lambda model: model.get_input_embeddings()
    unembed: Callable[[nn.Module], nn.Linear] = lambda model: model.get_output_embeddings()
    attn_out_gain: Callable[[nn.Module], Tensor | None] = _none  # block -> [d_model] gain after the output projection
    attn_norm: Callable[[nn.Module], nn.Module] = lambda block: block.input_layernorm  # block -> attention's input norm
    n_kv_heads: Callable[[nn.Module], int | None] = _none  # model -> KV heads where the config does not say (Falcon)
    # scalars the model's forward applies outside the modules above (None: 1)
    embed_multiplier: Callable[[nn.Module], float | None] = _none  # model -> factor on the embedding rows
    logit_multiplier: Callable[[nn.Module], float | None] = _none  # model -> factor on the LM head's output
    logit_softcap: Callable[[nn.Module], float | None] = _none  # model -> c in logits = c·tanh(logits / c)
    # only the hidden state passes from block to block (no K/V or state shared between layers), so a block's recorded
    # output can stand in for running it (the causal ablation starts each step at its first ablated layer)
    replayable_blocks: bool = True
    # ---- the QK side (maps_utils.qk.circuit): s(q, k) = scale · rope(norm_q(x_q W_Q + b_Q)) · rope(norm_k(x_k W_K + b_K))
    q_weight: Callable[[nn.Module, Dims], Tensor] = linear_q  # attn -> [n_heads, d_model, d_head]
    q_bias: Callable[[nn.Module, Dims], Tensor | None] = linear_q_bias  # attn -> [n_heads, d_head]
    k_weight: Callable[[nn.Module, Dims], Tensor] = linear_k  # attn -> [n_kv, d_model, d_head]
    k_bias: Callable[[nn.Module, Dims], Tensor | None] = linear_k_bias  # attn -> [n_kv, d_head]
    qk_norms: Callable[[nn.Module], tuple | None] = module_qk_norms  # attn -> (q norm, k norm) on [n, heads, d_head]
    # (model, layer, positions [n], like) -> (cos, sin) [n, r] of the rotary embedding on the first r dims, or None
    rope: Callable[[nn.Module, int, Tensor, Tensor], tuple[Tensor, Tensor] | None] = model_rope
    rope_interleaved: bool = False  # rotary pairs (2i, 2i+1) (GPT-J, Cohere) instead of (i, i + r/2)
    rope_float32: bool = False  # queries and keys pass through float32 before the rotation (Cohere)
    position_embed: Callable[[nn.Module], nn.Embedding | None] = _none  # model -> learned absolute positions (GPT-2)
    attn_scale: Callable[[nn.Module], float] = lambda attn: attn.scaling  # attn -> factor on q·k
    attn_softcap: Callable[[nn.Module], float | None] = lambda attn: getattr(attn, "attn_logit_softcapping", None)
    alibi: Callable[[nn.Module], bool] = lambda model: False  # model -> whether it uses ALiBi (the QK map refuses it)
    # ---- the checkpoint (maps_utils.models.checkpoint): where a checkpoint spells a parameter otherwise than the model
    checkpoint_names: tuple[tuple[str, str], ...] = ()  # (regex on a parameter's name, replacement) tried in order
    # (parameter name, read(checkpoint key) -> tensor) -> the parameter built from several stored tensors, or None
    checkpoint_fused: Callable[[str, Callable[[str], Tensor]], Tensor | None] = _not_fused


# ---- accessors shared by several families -------------------------------------------------------------
def bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "bias", None)


def linear_v(attn: nn.Module, d: Dims) -> Tensor:
    # nn.Linear weight is [out, in] = [n_kv*d_head, d_model]
    return attn.v_proj.weight.view(d.n_kv_heads, d.d_head, d.d_model).transpose(1, 2)


def linear_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = bias(attn.v_proj)
    return None if b is None else b.view(d.n_kv_heads, d.d_head)


def linear_o(proj: nn.Module, d: Dims) -> Tensor:
    # [d_model, n_heads*d_head] -> [n_heads, d_head, d_model]
    return proj.weight.view(d.d_model, d.n_heads, d.d_head).permute(1, 2, 0)


def split_kv(out: Tensor, d: Dims) -> Tensor:
    return out.unflatten(-1, (d.n_kv_heads, d.d_head))


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    return model.model.layers


def llama_like(family: str, model_types: tuple[str, ...], **changes) -> ArchSpec:
    """q/k/v/o_proj under ``self_attn``, ``input_layernorm`` before attention, ``post_attention_layernorm`` + ``mlp``
    after it (Llama, Qwen2 and the many families built like them); ``changes`` override any field."""
    fields = dict(
        family=family,
        model_types=model_types,
        parallel_attn_mlp=False,
        blocks=decoder_layers,
        attn=lambda block: block.self_attn,
        v_weight=linear_v,
        v_bias=linear_v_bias,
        out_proj=lambda attn: attn.o_proj,
        o_weight=lambda attn, d: linear_o(attn.o_proj, d),
        v_module=lambda attn: attn.v_proj,
        values_from_output=split_kv,
        mlp0=lambda block, x: block.mlp(block.post_attention_layernorm(x)),
    )
    return ArchSpec(**{**fields, **changes})


def fused_v(weight: Tensor, start: int, d: Dims, n: int | None = None) -> Tensor:
    """``[n, d_model, d_head]`` from the rows ``start : start + n*d_head`` of a fused [out, in] weight (n: the KV
    heads unless given)."""
    n = d.n_kv_heads if n is None else n
    return weight[start:start + n * d.d_head].view(n, d.d_head, d.d_model).transpose(1, 2)
