"""HeadWeights: per-head OV weights, embeddings, the first-MLP transform and hook points of one model, read
through its family's :class:`~maps_utils.heads.spec.ArchSpec`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core.errors import UnsupportedArchitectureError
from .offload import Offloaded, has_offload
from .ov import OVCircuit
from .parity import check_generic, not_reproduced, reading_raised
from .registry import GENERIC, spec_for
from .spec import ArchSpec, Dims, bias


def dims_of(model: nn.Module, spec: ArchSpec | None = None) -> Dims:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    d_model = cfg.hidden_size
    n_kv = spec.n_kv_heads(model) if spec is not None else None
    return Dims(
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv or getattr(cfg, "num_key_value_heads", None) or n_heads,
        d_model=d_model,
        d_head=getattr(cfg, "head_dim", None) or d_model // n_heads,
    )


class HeadWeights:
    """Per-head OV weights, embeddings, the first-MLP transform and hook points of one model.

    All tensors are views of (or computed from) the model's own parameters, on its device
    and in its dtype; nothing is copied at construction. Where the model's weights are offloaded or streamed
    (:mod:`.offload`), each accessor loads the one module it reads for the call, and the tensor it returns holds
    that module's weights after the module is dropped again. Where accelerate spread the model over several devices
    (``load(device_map=...)``), every tensor comes back on :attr:`device`, the LM head's, where the static steps
    compute (a layer's weights are copied there; on one device nothing moves).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec or spec_for(model)
        unchecked = spec is None and self.spec.family == GENERIC  # an unlisted model, read by the generic adapter
        try:
            self.dims = dims_of(model, self.spec)
            if self.dims.n_heads % self.dims.n_kv_heads:
                raise UnsupportedArchitectureError(
                    f"{self.dims.n_heads} query heads cannot be split evenly over {self.dims.n_kv_heads} KV heads."
                )
            self._blocks = self.spec.blocks(model)
            self._offload = Offloaded(model) if has_offload(model) else None
        except Exception as err:
            if not unchecked:
                raise
            raise not_reproduced(model, reading_raised(err)) from None
        if unchecked:
            check_generic(model, self)

    # ---- where the weights are -----------------------------------------------------------------
    def reading(self, *modules: nn.Module):
        """A context in which ``modules``' parameters are loaded (a no-op for a model held whole in memory)."""
        return self._offload.materialized(*modules) if self._offload is not None else contextlib.nullcontext()

    def stored(self, module: nn.Module, name: str = "weight") -> Tensor:
        """``module``'s parameter as stored: the parameter itself in memory; for a streamed or offloaded module, the
        checkpoint's tensor (memory-mapped, in the checkpoint's dtype), read without loading the module."""
        return self._offload.stored(module, name) if self._offload is not None else getattr(module, name)

    @property
    def streamed(self) -> bool:
        """Whether some of the model's weights are offloaded or streamed rather than held in memory."""
        return self._offload is not None

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype (its unembedding's, as the model holds it)."""
        return self.spec.unembed(self.model).weight.dtype

    @property
    def device(self) -> torch.device:
        """The device the model computes the unembedding on (its execution device where it is offloaded)."""
        w = self.spec.unembed(self.model).weight
        if w.is_meta and self._offload is not None:
            owner = self._offload.owner.get(self.spec.unembed(self.model))
            if owner is not None:
                return torch.device(self._offload.hooked[owner[0]].execution_device)
        return w.device

    @property
    def input_device(self) -> torch.device:
        """The device the model's embedding runs on: where a forward pass's input ids belong (:attr:`device` too on a
        model held on one device)."""
        return self.device_of(self.spec.embed(self.model))

    def device_of(self, module: nn.Module) -> torch.device:
        """Where ``module`` runs: the execution device of its accelerate hook (a dispatched, offloaded or streamed
        model), else the device of its first parameter or buffer that is not on ``meta``, else :attr:`device`."""
        hook = getattr(module, "_hf_hook", None)
        for h in (getattr(hook, "hooks", None) or (hook,)) if hook is not None else ():
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        for t in (*module.parameters(), *module.buffers()):
            if not t.is_meta:
                return t.device
        return self.device

    def _here(self, t: Tensor | None) -> Tensor | None:
        """``t`` on :attr:`device` (itself where it is there already)."""
        return None if t is None else t.to(self.device)

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
        attn = self.attn_module(layer)
        with self.reading(self.spec.v_module(attn)):
            return self._here(self.spec.v_weight(attn, self.dims))

    def W_V(self, layer: int) -> Tensor:
        """``[n_heads, d_model, d_head]`` value projection per query head (its KV group's, under GQA)."""
        return self.ov(layer).per_head_W_V()

    def b_V(self, layer: int) -> Tensor | None:
        """``[n_heads, d_head]`` value bias per query head, or None where the architecture has none."""
        attn = self.attn_module(layer)
        with self.reading(self.spec.v_module(attn)):
            b = self._here(self.spec.v_bias(attn, self.dims))
        return b if b is None or self.group_size == 1 else b[self.kv_groups.to(b.device)]

    def W_O(self, layer: int) -> Tensor:
        """``[n_heads, d_head, d_model]`` output projection per query head."""
        attn = self.attn_module(layer)
        with self.reading(self.spec.out_proj(attn)):
            return self._here(self.spec.o_weight(attn, self.dims))

    def b_O(self, layer: int) -> Tensor | None:
        """``[d_model]`` output-projection bias (shared by the layer's heads), or None."""
        proj = self.spec.out_proj(self.attn_module(layer))
        with self.reading(proj):
            return self._here(bias(proj))

    def attn_out_gain(self, layer: int) -> Tensor | None:
        """``[d_model]`` per-channel gain applied to the attention output before the residual, or None.

        Gemma-3 normalises the attention output (post_attention_layernorm); its gain is linear
        and per channel, while its 1/rms factor is a positive scalar per position.
        """
        block = self._blocks[layer]
        with self.reading(*self._norms(block)):
            return self._here(self.spec.attn_out_gain(block))

    def _norms(self, block: nn.Module) -> list[nn.Module]:
        """The block's modules whose parameters are all vectors (its norms), without its attention and MLP."""
        return [m for m in block.modules() if (ps := list(m.parameters(recurse=False))) and all(p.dim() == 1 for p in ps)]

    # ---- the QK side (read by maps_utils.qk.circuit) ---------------------------------------------------
    def W_Q(self, layer: int) -> Tensor:
        """``[n_heads, d_model, d_head]`` query projection per query head."""
        with self.reading(attn := self.attn_module(layer)):
            return self._here(self.spec.q_weight(attn, self.dims))

    def b_Q(self, layer: int) -> Tensor | None:
        """``[n_heads, d_head]`` query bias, or None."""
        with self.reading(attn := self.attn_module(layer)):
            return self._here(self.spec.q_bias(attn, self.dims))

    def W_K_kv(self, layer: int) -> Tensor:
        """``[n_kv_heads, d_model, d_head]`` key projection per KV head."""
        with self.reading(attn := self.attn_module(layer)):
            return self._here(self.spec.k_weight(attn, self.dims))

    def b_K_kv(self, layer: int) -> Tensor | None:
        """``[n_kv_heads, d_head]`` key bias, or None."""
        with self.reading(attn := self.attn_module(layer)):
            return self._here(self.spec.k_bias(attn, self.dims))

    def qk_norms(self, layer: int) -> tuple | None:
        """The layer's (query norm, key norm), each called on ``[n, heads, d_head]`` (returning on the input's
        device), or None."""
        norms = self.spec.qk_norms(self.attn_module(layer))
        if norms is None:
            return None
        # a norm on another device runs there (its accelerate hook moves the input) and its output comes back
        return tuple((lambda y, n=n: n(y).to(y.device)) for n in norms)

    def norm_input(self, layer: int, x: Tensor) -> Tensor:
        """``x`` ``[.., d_model]`` through the layer's attention input norm (:meth:`input_norm`), on ``x``'s device."""
        return self.input_norm(layer)(x).to(x.device)

    def rope(self, layer: int, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` ``[n, r]`` of the layer's rotary embedding at ``positions`` (on the first r dims of a head;
        pairs interleaved where ``spec.rope_interleaved``), on ``like``'s device, or None without rotary positions."""
        rope = self.spec.rope(self.model, layer, positions, like)
        return None if rope is None else tuple(t.to(like.device) for t in rope)

    def position_rows(self, positions: Tensor) -> Tensor | None:
        """``[n, d_model]`` learned absolute position embeddings at ``positions`` (GPT-2), or None."""
        emb = self.spec.position_embed(self.model)
        if emb is None:
            return None
        w = self.stored(emb)
        return w[positions.to(w.device)].to(device=self.device, dtype=self.dtype)

    def attn_scale(self, layer: int) -> float:
        """The factor the layer puts on q·k before the softmax."""
        return float(self.spec.attn_scale(self.attn_module(layer)))

    def attn_softcap(self, layer: int) -> float | None:
        """c where the layer caps its attention logits as c·tanh(s / c) (Gemma-2), else None."""
        return self.spec.attn_softcap(self.attn_module(layer))

    # ---- vocabulary-side matrices -------------------------------------------------------------
    def _scaled(self, rows: Tensor) -> Tensor:
        """Embedding rows as the model's forward scales them: the module's own scale, then the forward's."""
        emb = self.spec.embed(self.model)
        scale = getattr(emb, "embed_scale", None)
        if scale is not None:
            rows = rows * torch.as_tensor(scale, device=rows.device).to(rows.dtype)
        multiplier = self.spec.embed_multiplier(self.model)
        return rows if multiplier is None else rows * multiplier

    @property
    def embed_scale(self) -> float:
        """The factor E's rows carry over the embedding weights (sqrt(d_model) for Gemma, Granite's multiplier,
        else 1)."""
        return float(self._scaled(torch.ones((), dtype=self.dtype, device=self.device)))

    def embed(self, token_ids: Tensor | Sequence[int]) -> Tensor:
        """``[n, d_model]`` rows of E for ``token_ids``, exactly as the model's forward produces them."""
        w = self.stored(self.spec.embed(self.model))  # [vocab, d_model]; a streamed one stays on disk but these rows
        rows = w[torch.as_tensor(token_ids, device=w.device)]
        return self._scaled(rows.to(device=self.device, dtype=self.dtype))

    @property
    def E(self) -> Tensor:
        """``[vocab, d_model]`` token embedding (scaled as the architecture scales it)."""
        w = self.stored(self.spec.embed(self.model))
        return self._scaled(w.to(device=self.device, dtype=self.dtype))

    @property
    def U(self) -> Tensor:
        """``[d_model, vocab]`` unembedding: a view of the LM head (tied or not), times the factor the model's
        forward puts on its logits where it has one (Granite, Cohere)."""
        w = self.unembed_stored.to(device=self.device, dtype=self.dtype).T
        multiplier = self.spec.logit_multiplier(self.model)
        return w if multiplier is None else w * multiplier

    def U_block(self, start: int, stop: int) -> Tensor:
        """``[d_model, stop - start]``: columns ``start:stop`` of :attr:`U` (a view of it for a model held in memory;
        for a streamed one, only those rows of the LM head are read and converted)."""
        if self._offload is None:
            return self.U[:, start:stop]
        rows = self.unembed_stored[start:stop].to(device=self.device, dtype=self.dtype)
        multiplier = self.spec.logit_multiplier(self.model)
        return (rows if multiplier is None else rows * multiplier).T  # the layout of U[:, start:stop]

    @property
    def unembed_stored(self) -> Tensor:
        """``[vocab, d_model]`` LM-head weight as stored (for a streamed model: memory-mapped, the checkpoint's dtype;
        no logit factor)."""
        return self.stored(self.spec.unembed(self.model))

    @property
    def U_bias(self) -> Tensor | None:
        """``[vocab]`` LM-head bias (Phi, GPT-J), with the same logit factor, or None."""
        head = self.spec.unembed(self.model)
        b = None if bias(head) is None else self.stored(head, "bias").to(device=self.device, dtype=self.dtype)
        multiplier = self.spec.logit_multiplier(self.model)
        return b if b is None or multiplier is None else b * multiplier

    @property
    def logit_softcap(self) -> float | None:
        """c where the model caps its logits as c·tanh(x / c) (Gemma-2): monotone, so ranks under U are the
        model's; None elsewhere."""
        return self.spec.logit_softcap(self.model)

    def first_mlp(self, x: Tensor) -> Tensor:
        """Block 0's MLP branch as the architecture computes it (its norms included), without the residual.

        MAPS uses ``first_mlp(E)`` as the source representation for heads in layers >= 1. Computed where block 0
        runs (its hooks move ``x`` there), returned on ``x``'s device.
        """
        return self.spec.mlp0(self._blocks[0], x).to(x.device)

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
        """The layer's OV circuits, factored (:class:`~maps_utils.heads.ov.OVCircuit`): W_V per KV group, W_O per head."""
        return OVCircuit(self.W_V_kv(layer), self.W_O(layer), self.kv_groups)

    def summary(self) -> dict[str, object]:
        """Plain-dict description for tables and manifests."""
        return {
            "family": self.family, "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "group_size": self.group_size, "d_model": self.d_model, "d_head": self.d_head, "vocab_size": self.vocab_size,
            "parallel_attn_mlp": self.spec.parallel_attn_mlp, "v_bias": self.b_V(0) is not None,
            "o_bias": self.b_O(0) is not None, "unembed_bias": self.U_bias is not None,
            "embed_scale": self.embed_scale, "logit_softcap": self.logit_softcap, "attn_out_gain": self.attn_out_gain(0) is not None,
        }
