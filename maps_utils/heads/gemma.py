"""Gemma and the norm-placement families: the embedding scaled, or the attention and MLP outputs normalised
before they join the residual. The norm after the attention is a per-channel gain (``attn_out_gain``) times a
positive scalar per position, so each head's direction in the residual is its OV output times that gain."""

from __future__ import annotations

from torch import nn

from .spec import cos_sin, llama_like

_IDENTITY = nn.Identity()


def _sandwich_mlp0(block, x):
    return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x)))


def _gemma3_rope(model, layer, positions, like):  # local (sliding) and global layers rotate at different bases
    return cos_sin(model.model.rotary_emb(like, positions[None], model.config.layer_types[layer]))


def _olmo2_qk_norms(attn):  # q_norm / k_norm normalise all heads' queries (keys) together: [n, heads*d_head]
    def flat(norm):
        return lambda x: norm(x.flatten(-2)).unflatten(-1, x.shape[-2:])
    return flat(attn.q_norm), flat(attn.k_norm)


# --- Gemma (1): Llama-like; the embedding module scales by sqrt(d_model) (read by HeadWeights), norms use 1 + w.
GEMMA = llama_like("gemma", ("gemma",))
# --- Gemma-2: sandwich norms (post_attention_layernorm on the attention output, gain 1 + w; pre_/post_feedforward
# around the MLP), logits soft-capped as c·tanh(x / c) (monotone: ranks unchanged).
GEMMA2 = llama_like("gemma2", ("gemma2",), mlp0=_sandwich_mlp0,
                    attn_out_gain=lambda block: 1.0 + block.post_attention_layernorm.weight,
                    logit_softcap=lambda model: model.config.final_logit_softcapping)
# --- Gemma-3: as Gemma-2 without the soft cap.
GEMMA3 = llama_like("gemma3", ("gemma3_text",), mlp0=_sandwich_mlp0,
                    attn_out_gain=lambda block: 1.0 + block.post_attention_layernorm.weight, rope=_gemma3_rope)
# --- OLMo-2: no norm before attention or MLP (they read the raw residual); post_attention_layernorm (gain w) on
# the attention output, post_feedforward_layernorm on the MLP output.
OLMO2 = llama_like("olmo2", ("olmo2",), attn_norm=lambda block: _IDENTITY,
                   mlp0=lambda block, x: block.post_feedforward_layernorm(block.mlp(x)),
                   attn_out_gain=lambda block: block.post_attention_layernorm.weight, qk_norms=_olmo2_qk_norms)

FAMILIES = (GEMMA, GEMMA2, GEMMA3, OLMO2)
