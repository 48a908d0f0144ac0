"""Families with fused or differently named projections, most with attention and MLP in parallel: GPT-2, GPT-NeoX
(Pythia), GPT-J, Phi, Falcon."""

from __future__ import annotations

from torch import Tensor, nn

from .spec import ArchSpec, Dims, bias, cos_sin, linear_o, llama_like, split_kv


def _no_rope(model, layer, positions, like):
    return None


# --- GPT-2: fused Conv1D c_attn (weight [d_model, 3*d_model], columns [q | k | v], heads contiguous).
def _gpt2_v(attn: nn.Module, d: Dims) -> Tensor:
    w = attn.c_attn.weight[:, 2 * d.d_model : 3 * d.d_model]  # [d_model, n_heads*d_head]
    return w.view(d.d_model, d.n_kv_heads, d.d_head).permute(1, 0, 2)


def _gpt2_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    return attn.c_attn.bias[2 * d.d_model : 3 * d.d_model].view(d.n_kv_heads, d.d_head)


def _gpt2_qk(part: int):  # part 0: queries, 1: keys
    def weight(attn: nn.Module, d: Dims) -> Tensor:
        w = attn.c_attn.weight[:, part * d.d_model : (part + 1) * d.d_model]  # [d_model, n_heads*d_head]
        return w.view(d.d_model, d.n_heads, d.d_head).permute(1, 0, 2)

    def bias_(attn: nn.Module, d: Dims) -> Tensor | None:
        return attn.c_attn.bias[part * d.d_model : (part + 1) * d.d_model].view(d.n_heads, d.d_head)
    return weight, bias_


GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    parallel_attn_mlp=False,
    blocks=lambda model: model.transformer.h,
    attn=lambda block: block.attn,
    v_weight=_gpt2_v,
    v_bias=_gpt2_v_bias,
    out_proj=lambda attn: attn.c_proj,
    # Conv1D weight is [in, out] = [n_heads*d_head, d_model]
    o_weight=lambda attn, d: attn.c_proj.weight.view(d.n_heads, d.d_head, d.d_model),
    v_module=lambda attn: attn.c_attn,
    values_from_output=lambda out, d: split_kv(out[..., 2 * d.d_model : 3 * d.d_model], d),
    mlp0=lambda block, x: block.mlp(block.ln_2(x)),
    attn_norm=lambda block: block.ln_1,
    q_weight=_gpt2_qk(0)[0], q_bias=_gpt2_qk(0)[1], k_weight=_gpt2_qk(1)[0], k_bias=_gpt2_qk(1)[1],
    rope=_no_rope, position_embed=lambda model: model.transformer.wpe,  # learned absolute positions
)


# --- GPT-NeoX (Pythia): fused query_key_value (Linear [3*d_model, d_model]); rows per head are [q_h | k_h | v_h].
def _neox_v(attn: nn.Module, d: Dims) -> Tensor:
    w = attn.query_key_value.weight.view(d.n_heads, 3, d.d_head, d.d_model)[:, 2]  # [n_heads, d_head, d_model]
    return w.transpose(1, 2)


def _neox_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = bias(attn.query_key_value)
    return None if b is None else b.view(d.n_heads, 3, d.d_head)[:, 2]


def _neox_qk(part: int):  # part 0: queries, 1: keys (the same per-head [q_h | k_h | v_h] rows as the values)
    def weight(attn: nn.Module, d: Dims) -> Tensor:
        return attn.query_key_value.weight.view(d.n_heads, 3, d.d_head, d.d_model)[:, part].transpose(1, 2)

    def bias_(attn: nn.Module, d: Dims) -> Tensor | None:
        b = bias(attn.query_key_value)
        return None if b is None else b.view(d.n_heads, 3, d.d_head)[:, part]
    return weight, bias_


GPT_NEOX = ArchSpec(
    family="gpt_neox",
    model_types=("gpt_neox",),
    parallel_attn_mlp=True,  # when config.use_parallel_residual (Pythia); MLP0 reads its own LN of the input
    blocks=lambda model: model.gpt_neox.layers,
    attn=lambda block: block.attention,
    v_weight=_neox_v,
    v_bias=_neox_v_bias,
    out_proj=lambda attn: attn.dense,
    o_weight=lambda attn, d: linear_o(attn.dense, d),
    v_module=lambda attn: attn.query_key_value,
    values_from_output=lambda out, d: out.unflatten(-1, (d.n_heads, 3, d.d_head))[..., 2, :],
    mlp0=lambda block, x: block.mlp(block.post_attention_layernorm(x)),
    checkpoint_names=((r"^lm_head\.", "embed_out."),),  # GPT-NeoX checkpoints name the LM head embed_out
    q_weight=_neox_qk(0)[0], q_bias=_neox_qk(0)[1], k_weight=_neox_qk(1)[0], k_bias=_neox_qk(1)[1],
    rope=lambda model, layer, positions, like: cos_sin(model.gpt_neox.rotary_emb(like, positions[None])),
)


# --- Phi (phi-1/1.5/2): separate q/k/v_proj with biases, output `dense`; attention and MLP in parallel
# on one shared input_layernorm; lm_head has a bias.
PHI = llama_like(
    "phi", ("phi",),
    parallel_attn_mlp=True,
    out_proj=lambda attn: attn.dense,
    o_weight=lambda attn, d: linear_o(attn.dense, d),
    mlp0=lambda block, x: block.mlp(block.input_layernorm(x)),
)


# --- GPT-J's rotary module returns (sin, cos) for the rotary_dim/2 frequencies; each is repeated for its pair.
def _gptj_rope(model: nn.Module, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    sin, cos = cos_sin(model.transformer.rotary_emb(like, positions[None]))
    return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)


# --- GPT-J: q/k/v_proj and out_proj (no biases) under `attn`; attention and MLP in parallel on one ln_1; the LM
# head has a bias.
GPTJ = llama_like(
    "gptj", ("gptj",),
    parallel_attn_mlp=True,
    blocks=lambda model: model.transformer.h,
    attn=lambda block: block.attn,
    out_proj=lambda attn: attn.out_proj,
    o_weight=lambda attn, d: linear_o(attn.out_proj, d),
    mlp0=lambda block, x: block.mlp(block.ln_1(x)),
    attn_norm=lambda block: block.ln_1,
    rope=lambda model, layer, positions, like: _gptj_rope(model, positions, like),
    rope_interleaved=True,
)


# --- Falcon: one fused query_key_value whose rows come in KV groups of [q x (heads per group), k, v] (d_head rows
# each). That one layout covers all three of its variants: the new decoder architecture (grouped), multi-query (one
# group: [q_0 .. q_H-1, k, v]) and multi-head (H groups: [q_h, k_h, v_h] interleaved). The KV-head count is the
# attention module's (a multi-query config still reports num_kv_heads = heads). Its norms depend on the variant.
def _falcon_group(d: Dims) -> int:
    return d.n_heads // d.n_kv_heads + 2  # rows (in d_head units) per KV group


def _falcon_v(attn: nn.Module, d: Dims) -> Tensor:
    w = attn.query_key_value.weight.view(d.n_kv_heads, _falcon_group(d), d.d_head, d.d_model)[:, -1]
    return w.transpose(1, 2)  # [n_kv, d_model, d_head]


def _falcon_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = bias(attn.query_key_value)
    return None if b is None else b.view(d.n_kv_heads, _falcon_group(d), d.d_head)[:, -1]


def _falcon_qk(part: str):  # "q": the group's query heads, "k": its key head
    def rows(t: Tensor, d: Dims, *tail: int) -> Tensor:
        g = t.view(d.n_kv_heads, _falcon_group(d), d.d_head, *tail)
        return g[:, : d.n_heads // d.n_kv_heads].reshape(d.n_heads, d.d_head, *tail) if part == "q" else g[:, -2]

    def weight(attn: nn.Module, d: Dims) -> Tensor:
        return rows(attn.query_key_value.weight, d, d.d_model).transpose(1, 2)

    def bias_(attn: nn.Module, d: Dims) -> Tensor | None:
        b = bias(attn.query_key_value)
        return None if b is None else rows(b, d)
    return weight, bias_


def _falcon_two_norms(block: nn.Module) -> bool:
    return bool(block.config.new_decoder_architecture and block.config.num_ln_in_parallel_attn == 2)


def _falcon_mlp_norm(block: nn.Module) -> nn.Module:
    if _falcon_two_norms(block):
        return block.ln_mlp
    if block.config.new_decoder_architecture or block.config.parallel_attn:
        return block.input_layernorm
    return block.post_attention_layernorm


FALCON = ArchSpec(
    family="falcon",
    model_types=("falcon",),
    parallel_attn_mlp=True,  # unless config.parallel_attn is False (then sequential, post_attention_layernorm)
    blocks=lambda model: model.transformer.h,
    attn=lambda block: block.self_attention,
    v_weight=_falcon_v,
    v_bias=_falcon_v_bias,
    out_proj=lambda attn: attn.dense,
    o_weight=lambda attn, d: linear_o(attn.dense, d),
    v_module=lambda attn: attn.query_key_value,
    values_from_output=lambda out, d: out.unflatten(-1, (d.n_kv_heads, _falcon_group(d), d.d_head))[..., -1, :],
    mlp0=lambda block, x: block.mlp(_falcon_mlp_norm(block)(x)),
    attn_norm=lambda block: block.ln_attn if _falcon_two_norms(block) else block.input_layernorm,
    n_kv_heads=lambda model: model.transformer.h[0].self_attention.num_kv_heads,
    q_weight=_falcon_qk("q")[0], q_bias=_falcon_qk("q")[1], k_weight=_falcon_qk("k")[0], k_bias=_falcon_qk("k")[1],
    rope=lambda model, layer, positions, like: cos_sin(model.transformer.rotary_emb(like, positions[None])),
    attn_scale=lambda attn: attn.inv_norm_factor,
    alibi=lambda model: bool(model.config.alibi),
)

FAMILIES = (GPT2, GPT_NEOX, GPTJ, PHI, FALCON)
