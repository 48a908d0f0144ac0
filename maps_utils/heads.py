"""Architecture adapters: per-head OV weights, embeddings and hook points for every family.

Everything that differs between architectures lives in :data:`ADAPTERS`, one
:class:`ArchSpec` per family of tiny accessors. The rest of the package only talks to
:class:`HeadWeights` and never branches on the model type.

Conventions (row vectors, as in the paper): a residual vector ``x`` of shape ``[d_model]``
gives head ``h``'s value ``v_h = x @ W_V[h] + b_V[h]`` (``[d_head]``); after attention mixes
values into ``z_h``, the head writes ``z_h @ W_O[h]`` (``[d_model]``) and the attention
block's output is ``sum_h z_h @ W_O[h] + b_O``. Under grouped-query attention the query
heads of one KV group share ``W_V``/``b_V`` (group ``h // (n_heads // n_kv_heads)``) and
keep their own ``W_O``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import UnsupportedArchitectureError
from .ov import OVCircuit


@dataclass(frozen=True)
class Dims:
    """Head geometry read from the config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int


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
    attn_out_gain: Callable[[nn.Module], Tensor | None] = lambda block: None  # per-channel gain after o_proj
    attn_norm: Callable[[nn.Module], nn.Module] = lambda block: block.input_layernorm  # block -> attention's input norm


def _bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "bias", None)


def _linear_v(attn: nn.Module, d: Dims) -> Tensor:
    # nn.Linear weight is [out, in] = [n_kv*d_head, d_model]
    return attn.v_proj.weight.view(d.n_kv_heads, d.d_head, d.d_model).transpose(1, 2)


def _linear_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = _bias(attn.v_proj)
    return None if b is None else b.view(d.n_kv_heads, d.d_head)


def _linear_o(proj: nn.Module, d: Dims) -> Tensor:
    # [d_model, n_heads*d_head] -> [n_heads, d_head, d_model]
    return proj.weight.view(d.d_model, d.n_heads, d.d_head).permute(1, 2, 0)


def _split_kv(out: Tensor, d: Dims) -> Tensor:
    return out.unflatten(-1, (d.n_kv_heads, d.d_head))


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    return model.model.layers


def _llama_like(family: str, model_types: tuple[str, ...]) -> ArchSpec:
    """Llama, Qwen2 (and the same module names): q/k/v/o_proj, post_attention_layernorm + mlp."""
    return ArchSpec(
        family=family,
        model_types=model_types,
        parallel_attn_mlp=False,
        blocks=_decoder_layers,
        attn=lambda block: block.self_attn,
        v_weight=_linear_v,
        v_bias=_linear_v_bias,
        out_proj=lambda attn: attn.o_proj,
        o_weight=lambda attn, d: _linear_o(attn.o_proj, d),
        v_module=lambda attn: attn.v_proj,
        values_from_output=_split_kv,
        mlp0=lambda block, x: block.mlp(block.post_attention_layernorm(x)),
    )


# --- GPT-2: fused Conv1D c_attn (weight [d_model, 3*d_model], columns [q | k | v], heads contiguous).
def _gpt2_v(attn: nn.Module, d: Dims) -> Tensor:
    w = attn.c_attn.weight[:, 2 * d.d_model : 3 * d.d_model]  # [d_model, n_heads*d_head]
    return w.view(d.d_model, d.n_kv_heads, d.d_head).permute(1, 0, 2)


def _gpt2_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    return attn.c_attn.bias[2 * d.d_model : 3 * d.d_model].view(d.n_kv_heads, d.d_head)


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
    values_from_output=lambda out, d: _split_kv(out[..., 2 * d.d_model : 3 * d.d_model], d),
    mlp0=lambda block, x: block.mlp(block.ln_2(x)),
    attn_norm=lambda block: block.ln_1,
)


# --- GPT-NeoX (Pythia): fused query_key_value (Linear [3*d_model, d_model]); rows per head are [q_h | k_h | v_h].
def _neox_v(attn: nn.Module, d: Dims) -> Tensor:
    w = attn.query_key_value.weight.view(d.n_heads, 3, d.d_head, d.d_model)[:, 2]  # [n_heads, d_head, d_model]
    return w.transpose(1, 2)


def _neox_v_bias(attn: nn.Module, d: Dims) -> Tensor | None:
    b = _bias(attn.query_key_value)
    return None if b is None else b.view(d.n_heads, 3, d.d_head)[:, 2]


GPT_NEOX = ArchSpec(
    family="gpt_neox",
    model_types=("gpt_neox",),
    parallel_attn_mlp=True,  # when config.use_parallel_residual (Pythia); MLP0 reads its own LN of the input
    blocks=lambda model: model.gpt_neox.layers,
    attn=lambda block: block.attention,
    v_weight=_neox_v,
    v_bias=_neox_v_bias,
    out_proj=lambda attn: attn.dense,
    o_weight=lambda attn, d: _linear_o(attn.dense, d),
    v_module=lambda attn: attn.query_key_value,
    values_from_output=lambda out, d: out.unflatten(-1, (d.n_heads, 3, d.d_head))[..., 2, :],
    mlp0=lambda block, x: block.mlp(block.post_attention_layernorm(x)),
)


# --- Phi (phi-1/1.5/2): separate q/k/v_proj with biases, output `dense`; attention and MLP in parallel
# on one shared input_layernorm; lm_head has a bias.
PHI = ArchSpec(
    family="phi",
    model_types=("phi",),
    parallel_attn_mlp=True,
    blocks=_decoder_layers,
    attn=lambda block: block.self_attn,
    v_weight=_linear_v,
    v_bias=_linear_v_bias,
    out_proj=lambda attn: attn.dense,
    o_weight=lambda attn, d: _linear_o(attn.dense, d),
    v_module=lambda attn: attn.v_proj,
    values_from_output=_split_kv,
    mlp0=lambda block, x: block.mlp(block.input_layernorm(x)),
)

LLAMA = _llama_like("llama", ("llama",))
QWEN2 = _llama_like("qwen2", ("qwen2",))


# --- Gemma-3: Llama-like attention, but the embedding is scaled by sqrt(d_model) inside the embedding
# module, the attention output passes a post_attention_layernorm (gain 1 + w) before the residual,
# and the MLP is sandwiched between pre_ and post_feedforward_layernorm.
GEMMA3 = ArchSpec(
    family="gemma3",
    model_types=("gemma3_text",),
    parallel_attn_mlp=False,
    blocks=_decoder_layers,
    attn=lambda block: block.self_attn,
    v_weight=_linear_v,
    v_bias=_linear_v_bias,
    out_proj=lambda attn: attn.o_proj,
    o_weight=lambda attn, d: _linear_o(attn.o_proj, d),
    v_module=lambda attn: attn.v_proj,
    values_from_output=_split_kv,
    mlp0=lambda block, x: block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x))),
    attn_out_gain=lambda block: 1.0 + block.post_attention_layernorm.weight,
)

ADAPTERS: tuple[ArchSpec, ...] = (GPT2, GPT_NEOX, PHI, LLAMA, GEMMA3, QWEN2)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for spec in ADAPTERS for t in spec.model_types)


def spec_for(model: nn.Module) -> ArchSpec:
    """The adapter for ``model`` (by ``config.model_type``), or a clear error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ADAPTERS:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"Architecture '{model_type}' is not supported; MAPS adapters exist for "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (add an ArchSpec to maps_utils/heads.py for others)."
    )


def dims_of(model: nn.Module) -> Dims:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_model = cfg.hidden_size
    return Dims(
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        d_model=d_model,
        d_head=getattr(cfg, "head_dim", None) or d_model // n_heads,
    )


class HeadWeights:
    """Per-head OV weights, embeddings, the first-MLP transform and hook points of one model.

    All tensors are views of (or computed from) the model's own parameters, on its device
    and in its dtype; nothing is copied at construction.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec or spec_for(model)
        self.dims = dims_of(model)
        if self.dims.n_heads % self.dims.n_kv_heads:
            raise UnsupportedArchitectureError(
                f"{self.dims.n_heads} query heads cannot be split evenly over {self.dims.n_kv_heads} KV heads."
            )
        self._blocks = self.spec.blocks(model)

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def n_layers(self) -> int:
        return len(self._blocks)

    @property
    def n_heads(self) -> int:
        return self.dims.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.dims.n_kv_heads

    @property
    def d_model(self) -> int:
        return self.dims.d_model

    @property
    def d_head(self) -> int:
        return self.dims.d_head

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.dims.n_heads // self.dims.n_kv_heads

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding (may exceed the tokenizer's length, e.g. padded vocabularies)."""
        return self.spec.unembed(self.model).weight.shape[0]

    def kv_group(self, head: int) -> int:
        """The KV group (index of the shared value head) of query head ``head``."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range 0..{self.n_heads - 1}")
        return head // self.group_size

    @property
    def kv_groups(self) -> Tensor:
        """``[n_heads]`` KV group of every query head."""
        return torch.arange(self.n_heads) // self.group_size

    # ---- per-layer weights ------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        return self._blocks[layer]

    def attn_module(self, layer: int) -> nn.Module:
        """The attention module: input = normalised residual, first output = sum_h z_h W_O[h] + b_O."""
        return self.spec.attn(self._blocks[layer])

    def input_norm(self, layer: int) -> nn.Module:
        """The norm module the layer's attention reads the residual through (gain, and centring and bias for LayerNorm)."""
        return self.spec.attn_norm(self._blocks[layer])

    def W_V_kv(self, layer: int) -> Tensor:
        """``[n_kv_heads, d_model, d_head]`` value projection per KV head."""
        return self.spec.v_weight(self.attn_module(layer), self.dims)

    def W_V(self, layer: int) -> Tensor:
        """``[n_heads, d_model, d_head]`` value projection per query head (its KV group's, under GQA)."""
        return self.ov(layer).per_head_W_V()

    def b_V(self, layer: int) -> Tensor | None:
        """``[n_heads, d_head]`` value bias per query head, or None where the architecture has none."""
        b = self.spec.v_bias(self.attn_module(layer), self.dims)
        return b if b is None or self.group_size == 1 else b[self.kv_groups.to(b.device)]

    def W_O(self, layer: int) -> Tensor:
        """``[n_heads, d_head, d_model]`` output projection per query head."""
        return self.spec.o_weight(self.attn_module(layer), self.dims)

    def b_O(self, layer: int) -> Tensor | None:
        """``[d_model]`` output-projection bias (shared by the layer's heads), or None."""
        return _bias(self.spec.out_proj(self.attn_module(layer)))

    def attn_out_gain(self, layer: int) -> Tensor | None:
        """``[d_model]`` per-channel gain applied to the attention output before the residual, or None.

        Gemma-3 normalises the attention output (post_attention_layernorm); its gain is linear
        and per channel, while its 1/rms factor is a positive scalar per position.
        """
        return self.spec.attn_out_gain(self._blocks[layer])

    # ---- vocabulary-side matrices -------------------------------------------------------------
    @property
    def embed_scale(self) -> Tensor:
        """Scalar the embedding module multiplies rows by (sqrt(d_model) for Gemma, else 1)."""
        emb = self.spec.embed(self.model)
        scale = getattr(emb, "embed_scale", 1.0)
        return torch.as_tensor(scale, device=emb.weight.device).to(emb.weight.dtype)

    def embed(self, token_ids: Tensor | Sequence[int]) -> Tensor:
        """``[n, d_model]`` rows of E for ``token_ids``, exactly as the model's embedding produces them."""
        emb = self.spec.embed(self.model)
        ids = torch.as_tensor(token_ids, device=emb.weight.device)
        return emb.weight[ids] * self.embed_scale

    @property
    def E(self) -> Tensor:
        """``[vocab, d_model]`` token embedding (scaled as the architecture scales it)."""
        emb = self.spec.embed(self.model)
        return emb.weight * self.embed_scale

    @property
    def U(self) -> Tensor:
        """``[d_model, vocab]`` unembedding (a view of the LM head; tied or not)."""
        return self.spec.unembed(self.model).weight.T

    @property
    def U_bias(self) -> Tensor | None:
        """``[vocab]`` LM-head bias (Phi), or None."""
        return _bias(self.spec.unembed(self.model))

    def first_mlp(self, x: Tensor) -> Tensor:
        """Block 0's MLP branch as the architecture computes it (its norms included), without the residual.

        MAPS uses ``first_mlp(E)`` as the source representation for heads in layers >= 1.
        """
        return self.spec.mlp0(self._blocks[0], x)

    # ---- hook points -----------------------------------------------------------------------
    def out_proj_module(self, layer: int) -> nn.Module:
        """Module whose *input* is z, all heads' mixed values ``[.., n_heads*d_head]`` in head order."""
        return self.spec.out_proj(self.attn_module(layer))

    def v_module(self, layer: int) -> nn.Module:
        """Module whose *output* contains the value vectors (see :meth:`values_from_output`)."""
        return self.spec.v_module(self.attn_module(layer))

    def values_from_output(self, out: Tensor) -> Tensor:
        """``[.., n_kv_heads, d_head]`` value vectors from the output of :meth:`v_module`."""
        return self.spec.values_from_output(out, self.dims)

    def split_z(self, z: Tensor) -> Tensor:
        """``[.., n_heads*d_head]`` -> ``[.., n_heads, d_head]``."""
        return z.unflatten(-1, (self.n_heads, self.d_head))

    def ov(self, layer: int) -> OVCircuit:
        """The layer's OV circuits, factored (:class:`~maps_utils.ov.OVCircuit`): W_V per KV group, W_O per head."""
        return OVCircuit(self.W_V_kv(layer), self.W_O(layer), self.kv_groups)

    def summary(self) -> dict[str, object]:
        """Plain-dict description for tables and manifests."""
        return {
            "family": self.family, "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "group_size": self.group_size, "d_model": self.d_model, "d_head": self.d_head, "vocab_size": self.vocab_size,
            "parallel_attn_mlp": self.spec.parallel_attn_mlp, "v_bias": self.b_V(0) is not None,
            "o_bias": self.b_O(0) is not None, "unembed_bias": self.U_bias is not None,
            "embed_scale": float(self.embed_scale), "attn_out_gain": self.attn_out_gain(0) is not None,
        }
