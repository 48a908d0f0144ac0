"""Static QK map: where a head looks, read from its parameters (the QK side beside MAPS's OV map).

For query head h of layer l, in KV group g(h), the preference of a query token q for a key token k is the head's
pre-softmax attention logit

    s_h(q, k) = scale · rot(n_q(x̂_q W_Q[h] + b_Q[h]), p_q) · rot(n_k(x̂_k W_K[g] + b_K[g]), p_k)

(then c·tanh(s / c) where the layer caps its logits, Gemma-2), with every piece the model's own (adapter table,
:mod:`maps_utils.heads`):

* x̂ = the layer's input norm of the token's representation x (:mod:`maps_utils.static.sources`: ``first_mlp`` by default,
  the paper's OV representation) plus, for learned absolute positions (GPT-2), the position embedding at p;
* n_q, n_k: the attention's query/key norms where it has them (Qwen3, Gemma-3, OLMo-2, Cohere, Phi, StableLM);
* rot(·, p): the rotary embedding at position p (none for GPT-2); RoPE makes s depend on p_q − p_k only;
* scale: the factor on q·k (1/√d_head, Gemma's query_pre_attn_scalar, Granite's attention multiplier, …).

**Positions** (:class:`QKOptions`). The paper has no QK map, so the defaults are ours and explicit: the key sits at
``key_position`` (1: the first token after a BOS) and the query ``offset`` tokens later; the score is the mean of
the logits over ``offsets`` (default 1–8, the span between a subject and the last token of the study's relation
prompts). On a real prompt (:meth:`QKMap.prompt_logits`) every token sits at its own position instead.

**Cost.** Queries are ``[n, n_heads, d_head]`` and keys ``[n, n_kv, d_head]``; a vocabulary-wide readout scores
one chunk of keys at a time, so nothing of size V×V (or d_model×d_model) is ever formed. Masks (causal, sliding
windows) are not part of the map: they depend on the prompt, not on the parameters. ALiBi models are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import OptionError, UnsupportedArchitectureError
from ..core.params import check_parameters
from ..heads import HeadWeights
from ..heads.parity import TOLERANCE, capture_attention
from ..heads.registry import GENERIC
from ..static import sources

DEFAULT_OFFSETS = tuple(range(1, 9))


@dataclass(frozen=True)
class QKOptions:
    """Where the query and key tokens sit and how they are represented (the defaults are documented above)."""

    representation: str = "first_mlp"  # a parameters-only base of maps_utils.static.sources (no "+norm": see input_norm)
    offsets: tuple[int, ...] = DEFAULT_OFFSETS  # query position − key position; logits are averaged over them
    key_position: int = 1  # the key's absolute position (matters only for learned position embeddings)
    input_norm: bool = True  # read x through the layer's input norm, as the attention does

    def check(self, weights: HeadWeights) -> None:
        """One :class:`~maps_utils.core.errors.OptionError` sentence for options that cannot work on ``weights``."""
        rep = sources.parse(self.representation)
        if rep.norm:
            raise OptionError(f"representation '{self.representation}': the QK map applies the layer's input norm "
                              "itself (input_norm=True); drop '+norm'.")
        if not self.offsets:
            raise OptionError("offsets is empty: give one or more whole numbers >= 0 (query position minus key "
                              "position).")
        check_parameters(offsets=list(self.offsets), key_position=self.key_position)
        table = weights.spec.position_embed(weights.model)
        if table is not None and self.key_position + max(self.offsets) >= table.weight.shape[0]:
            raise OptionError(f"key_position + offsets reach position {self.key_position + max(self.offsets)}, but "
                              f"{weights.family} has learned positions 0..{table.weight.shape[0] - 1}; use smaller ones.")
        if weights.spec.alibi(weights.model):
            raise OptionError(f"{weights.family} uses ALiBi position biases, which the static QK map does not read; "
                              "use a model with rotary or learned positions.")
        if weights.family == GENERIC:
            problem = generic_mismatch(weights)
            if problem is not None:
                raise UnsupportedArchitectureError(
                    f"The generic adapter's static QK map does not reproduce {weights.model.config.model_type}'s "
                    f"attention: {problem}; add an ArchSpec for it in maps_utils/heads/.")


# ---- the pieces: projections, rotation, logits -----------------------------------------------------------
def rotate(y: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """``y`` ``[n, heads, d_head]`` rotated on its first r dims by ``cos``/``sin`` ``[n, r]`` (pairs (i, i + r/2), or
    (2i, 2i+1) when ``interleaved``); the other dims pass unchanged."""
    r = cos.shape[-1]
    y_rot, y_pass = y[..., :r], y[..., r:]
    if interleaved:
        turned = torch.stack((-y_rot[..., 1::2], y_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        turned = torch.cat((-y_rot[..., r // 2:], y_rot[..., : r // 2]), dim=-1)
    out = y_rot * cos[:, None] + turned * sin[:, None]
    return torch.cat((out, y_pass), dim=-1)


def project(weights: HeadWeights, layer: int, x: Tensor, positions: Tensor, side: str,
            input_norm: bool = True) -> Tensor:
    """Queries ``[n, n_heads, d_head]`` (``side="q"``) or keys ``[n, n_kv, d_head]`` (``"k"``) of representations
    ``x`` ``[n, d_model]`` at ``positions`` ``[n]``, exactly as the layer's attention forms them."""
    pos_rows = weights.position_rows(positions)
    if pos_rows is not None:
        x = x + pos_rows.to(x.dtype)
    if input_norm:
        x = weights.norm_input(layer, x)
    return head_states(weights, layer, x, positions, side)


def head_states(weights: HeadWeights, layer: int, x: Tensor, positions: Tensor, side: str) -> Tensor:
    """:func:`project` from the attention's own input ``x`` ``[n, d_model]`` (already normalised, positions added)."""
    W, b = (weights.W_Q(layer), weights.b_Q(layer)) if side == "q" else (weights.W_K_kv(layer), weights.b_K_kv(layer))
    y = torch.einsum("nd,hde->nhe", x, W.to(x.dtype))  # [n, heads, d_head]
    if b is not None:
        y = y + b.to(x.dtype)
    norms = weights.qk_norms(layer)
    if norms is not None:
        y = norms[0 if side == "q" else 1](y)
    rope = weights.rope(layer, positions, y)
    if rope is None:
        return y
    y_in = y.float() if weights.spec.rope_float32 else y
    return rotate(y_in, *rope, weights.spec.rope_interleaved).to(y.dtype)


def logits(weights: HeadWeights, layer: int, q: Tensor, k: Tensor) -> Tensor:
    """``[..., n_heads, n_q, n_k]`` logits of queries ``q`` ``[..., n_q, n_heads, d_head]`` against keys ``k``
    ``[n_k, n_kv, d_head]`` (each query head against its KV group's key; scale and soft cap applied)."""
    G, per = weights.n_kv_heads, weights.group_size
    up = torch.promote_types(q.dtype, torch.float32)  # half-precision queries and keys: the product in float32
    qg = q.to(up).unflatten(-2, (G, per))  # [..., n_q, G, per, d_head]
    s = torch.einsum("...qgpe,kge->...gpqk", qg, k.to(up)).flatten(-4, -3) * weights.attn_scale(layer)  # [.., H, nq, nk]
    cap = weights.attn_softcap(layer)
    return s if cap is None else torch.tanh(s / cap) * cap


def generic_mismatch(weights: HeadWeights, tol: float | None = None) -> str | None:
    """For a model read by the generic adapter: None when the QK map's logits, from the attention's real inputs on
    a seeded random sequence, equal the model's (log attention weights, up to each query's constant; relative ``tol``,
    default by dtype and at least 1e-5, since many models take the softmax in float32), else one sentence. The OV
    parity checks (:mod:`maps_utils.heads.parity`) do not cover queries and keys."""

    tol = tol if tol is not None else max(1e-5, TOLERANCE.get(weights.dtype, 1e-4))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, weights.vocab_size, (1, 8), generator=g).to(weights.device)
    try:
        with torch.no_grad():
            store = capture_attention(weights.model, weights, ids)
            for layer, rec in store.items():
                if rec["A"] is None:
                    return "the model returns no attention weights to check it against (load it with eager attention)"
                pos = torch.arange(ids.shape[1], device=ids.device)
                x = rec["x"][0]  # [T, d] the attention's input
                s = logits(weights, layer, head_states(weights, layer, x, pos, "q"),
                           head_states(weights, layer, x, pos, "k"))[:, -1]  # [H, T] from the last position
                real = rec["A"][0, :, -1].double().log()
                ours, theirs = (s - s[:, :1]).double(), real - real[:, :1]
                err = float((ours - theirs).abs().max() / (theirs.abs().max() + 1e-12))
                if not err < tol:  # NaN (a weight that underflowed, a NaN logit) fails too
                    return f"its logits differ at layer {layer} (relative error {err:.2g})"
    except Exception as err:  # the accessors fitted the OV side but not the QK side
        return f"reading its queries and keys raised {type(err).__name__}"
    return None


# ---- a model's static QK map ------------------------------------------------------------------------------
class QKMap:
    """The static QK map of every head of one model under :class:`QKOptions` (see the module docstring)."""

    def __init__(self, weights: HeadWeights, options: QKOptions = QKOptions()):
        options.check(weights)
        self.weights, self.options = weights, options
        self.dtype = weights.dtype  # the model's own: its norm modules run in it
        self.device = weights.device

    def vectors(self, token_ids, layers: Sequence[int] | None = None) -> sources.SourceVectors:
        """The tokens' representations (before any norm) for ``layers``."""
        return sources.SourceVectors(self.weights, token_ids, self.options.representation, layers=layers,
                                     dtype=self.dtype)

    def _x(self, xs: sources.SourceVectors, layer: int) -> Tensor:
        return xs.unnormed(layer).to(self.dtype)

    def _pos(self, p: int, n: int) -> Tensor:
        return torch.full((n,), p, dtype=torch.long, device=self.device)

    def queries(self, layer: int, xs: sources.SourceVectors) -> Tensor:
        """``[n_offsets, n, n_heads, d_head]``: the tokens as queries ``offset`` positions after the key."""
        x, o = self._x(xs, layer), self.options
        return torch.stack([project(self.weights, layer, x, self._pos(o.key_position + d, len(x)), "q", o.input_norm)
                            for d in o.offsets])

    def keys(self, layer: int, xs: sources.SourceVectors) -> Tensor:
        """``[n, n_kv, d_head]``: the tokens as keys at ``key_position``."""
        x, o = self._x(xs, layer), self.options
        return project(self.weights, layer, x, self._pos(o.key_position, len(x)), "k", o.input_norm)

    @torch.inference_mode()
    def scores(self, layer: int, query_ids, key_ids) -> Tensor:
        """``[n_heads, n_q, n_k]`` static logits s(q, k), averaged over the offsets."""
        q = self.queries(layer, self.vectors(query_ids, [layer]))
        k = self.keys(layer, self.vectors(key_ids, [layer]))
        return logits(self.weights, layer, q, k).mean(0)

    @torch.inference_mode()
    def salient_keys(self, layer: int, query_ids, top: int = 10, *, chunk: int = 16384,
                     progress: bool = False) -> tuple[Tensor, Tensor]:
        """Each head's ``top`` key tokens over the whole vocabulary for each query token: ``(logits, ids)``, each
        ``[n_heads, n_q, top]``, best first. Keys are scored ``chunk`` at a time."""
        q = self.queries(layer, self.vectors(query_ids, [layer]))  # [n_off, n_q, H, dh]
        H, n_q, V = self.weights.n_heads, q.shape[1], self.weights.vocab_size
        best_v = q.new_full((H, n_q, 0), float("-inf"))
        best_i = torch.zeros((H, n_q, 0), dtype=torch.long, device=self.device)
        for start in tqdm(range(0, V, chunk), desc=f"QK keys (layer {layer})", disable=not progress):
            ids = torch.arange(start, min(V, start + chunk), device=self.device)
            s = logits(self.weights, layer, q, self.keys(layer, self.vectors(ids, [layer]))).mean(0)  # [H, n_q, c]
            v, i = torch.topk(torch.cat([best_v, s], -1), min(top, best_v.shape[-1] + s.shape[-1]), dim=-1)
            best_i = torch.gather(torch.cat([best_i, ids.expand(H, n_q, -1)], -1), -1, i)
            best_v = v
        return best_v, best_i

    @torch.inference_mode()
    def attraction(self, *, chunk: int = 16384, progress: bool = True) -> Tensor:
        """QK saliency, ``[n_layers, n_heads, V]``: every key token's logit under the head's mean query (over
        :data:`~maps_utils.static.sources.STAT_TOKENS` evenly spaced vocabulary tokens and the offsets). Its top tokens are
        the keys the head prefers whatever the query; the analogue of OV saliency (norm amplification)."""
        w, L = self.weights, self.weights.n_layers
        sample = torch.linspace(0, w.vocab_size - 1, min(sources.STAT_TOKENS, w.vocab_size)).round().long().unique()
        qs = self.vectors(sample.to(self.device))
        mean_q = [self.queries(la, qs).mean((0, 1))[None] for la in range(L)]  # [1, H, dh] per layer
        out = torch.empty((L, w.n_heads, w.vocab_size), dtype=torch.float32)
        for start in tqdm(range(0, w.vocab_size, chunk), desc="QK saliency", disable=not progress):
            ids = torch.arange(start, min(w.vocab_size, start + chunk), device=self.device)
            ks = self.vectors(ids)
            for la in range(L):
                out[la, :, start:start + len(ids)] = logits(w, la, mean_q[la], self.keys(la, ks))[:, 0].float().cpu()
        return out

    @torch.inference_mode()
    def prompt_logits(self, layer: int, prompt_ids: Sequence[int], query: int = -1,
                      xs: sources.SourceVectors | None = None) -> Tensor:
        """``[n_heads, T]``: the static logits of the token at position ``query`` (default: the last) against every
        token of the prompt at its own position (RoPE offsets and learned positions as in the prompt)."""
        ids = torch.as_tensor(list(prompt_ids), device=self.device)
        T = len(ids)
        qpos = query % T
        xs = xs or self.vectors(ids, [layer])
        x = self._x(xs, layer)
        o = self.options
        q = project(self.weights, layer, x[qpos:qpos + 1], self._pos(qpos, 1), "q", o.input_norm)
        k = project(self.weights, layer, x, torch.arange(T, device=self.device), "k", o.input_norm)
        return logits(self.weights, layer, q, k)[:, 0]
