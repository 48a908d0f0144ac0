"""The static QK map at inference: does it say where heads really look, and does it, with the OV map, predict what
they write in context?

* **Validation.** On a prompt, the static logits of the last token against every token of the prompt at its own
  position (:meth:`maps_utils.qk.circuit.QKMap.prompt_logits`, from the parameters and the token ids alone) are compared with
  the head's real attention from the last position: top-1 agreement (the same position first), the same without
  position 0 (where most heads park attention, the attention sink), and Spearman's ρ over the prompt's positions.
* **Joint prediction.** The head's predicted output at the last position is the static-QK-weighted mixture of its
  OV rows over the prompt's tokens: ``z = Σ_t softmax_t(s(q_last, x_t)) · x_t W_V[g]`` (x_t the OV map's source
  representation, as in the static scores: no bias), written through ``W_O[h]`` and ranked against U like the
  dynamic scores. The joint score of a head for a template is the fraction of prompts whose target is in its top-k.
  Its control, the *attention oracle*, mixes the same OV rows by the head's real attention weights: where the oracle
  predicts well and the joint score does not, the QK map is what fails; where both fail, the mixture of
  parameter-only OV rows is.

Prompts are right-padded (:func:`maps_utils.dynamic.capture.pad_batch`): under causal attention the last position of each
prompt sees only its own tokens, at positions 0..last. Sliding windows are not applied to the static logits: the
study's prompts are far shorter than any window of the supported models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.errors import OptionError
from ..dynamic.capture import Prompt, build_prompts, pad_batch
from ..heads import HeadWeights
from ..heads.hooks import StopForward, pick, run_until_stop
from ..static import sources
from ..static.ranks import Columns, ranks_of_targets
from .circuit import QKMap, logits, project


# ---- real attention ----------------------------------------------------------------------------------------
@torch.inference_mode()
def real_attention(model, weights: HeadWeights, ids: Tensor, last: Tensor) -> Tensor:
    """``[B, L, H, T]``: every head's attention weights from each prompt's last position (0 past it), read in one
    forward pass that stops after the last layer's attention. The model must return its attention weights
    (``attn_implementation="eager"``, the loader's default). On ``ids``' device (each layer's are read where it runs,
    under a device map)."""
    L, B = weights.n_layers, ids.shape[0]
    rows = torch.arange(B, device=ids.device)
    out: list[Tensor | None] = [None] * L
    handles = []

    def hook(layer):
        def read(mod, args, output):
            a = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(a, Tensor):
                raise OptionError("The model does not return its attention weights; load it with "
                                  "attn_implementation='eager' (the default of maps_utils.load).")
            out[layer] = pick(a.transpose(1, 2), rows, last, to=ids.device)  # [B, H, T], in the model's dtype
            if layer == L - 1:
                raise StopForward
        return read

    for layer in range(L):
        handles.append(weights.attn_module(layer).register_forward_hook(hook(layer)))
    run_until_stop(model, handles, input_ids=ids, use_cache=False)
    return torch.stack(out, 1)


# ---- static logits of a batch of prompts --------------------------------------------------------------------
class PromptVectors:
    """The representations of a batch's distinct tokens, for the QK map and for the OV map."""

    def __init__(self, qmap: QKMap, ids: Tensor, ov_representation: str):
        self.uniq, self.index = torch.unique(ids, return_inverse=True)  # index: [B, T] into uniq
        self.qk = qmap.vectors(self.uniq)
        self.ov = sources.SourceVectors(qmap.weights, self.uniq, ov_representation, dtype=qmap.dtype)

    def qk_rows(self, layer: int, dtype) -> Tensor:
        return self.qk.unnormed(layer).to(dtype)[self.index]  # [B, T, d]

    def ov_rows(self, layer: int) -> Tensor:
        return self.ov.layer(layer)[self.index]  # [B, T, d]


def batch_logits(qmap: QKMap, layer: int, x: Tensor, last: Tensor) -> Tensor:
    """``[B, H, T]`` static logits of each prompt's last token against its tokens (``-inf`` past the last), from
    representations ``x`` ``[B, T, d]`` at positions 0..T-1."""
    w, o = qmap.weights, qmap.options
    B, T, _ = x.shape
    pos = torch.arange(T, device=x.device)
    k = project(w, layer, x.reshape(B * T, -1), pos.repeat(B), "k", o.input_norm).unflatten(0, (B, T))
    q = project(w, layer, x[torch.arange(B), last], last, "q", o.input_norm)  # [B, H, dh]
    s = torch.stack([logits(w, layer, q[b:b + 1], k[b])[:, 0] for b in range(B)])  # [B, H, T]
    return s.masked_fill(pos[None, None] > last[:, None, None], float("-inf"))


@torch.inference_mode()
def static_batch(qmap: QKMap, ids: Tensor, last: Tensor, ov_representation: str) -> tuple[Tensor, Tensor]:
    """``(logits [B, L, H, T], ov_values [B, L, T, n_kv, d_head])`` of a right-padded batch: the static QK logits
    of every head and the OV values ``x_t W_V[g]`` the joint prediction mixes."""
    w = qmap.weights
    vec = PromptVectors(qmap, ids, ov_representation)
    s, v = [], []
    for layer in range(w.n_layers):
        s.append(batch_logits(qmap, layer, vec.qk_rows(layer, qmap.dtype), last))
        v.append(torch.einsum("btd,gde->btge", vec.ov_rows(layer), w.W_V_kv(layer).to(qmap.dtype)))
    return torch.stack(s, 1), torch.stack(v, 1)


def joint_writes(weights: HeadWeights, s: Tensor, v: Tensor, a: Tensor | None = None) -> Tensor:
    """``[B, L, H, d_model]``: ``(Σ_t a_t · v_t[g(h)]) W_O[h]`` with ``a = softmax_t(s)`` from logits ``s``
    ``[B, L, H, T]`` (or the weights ``a`` given, e.g. the real attention), and OV values ``v``
    ``[B, L, T, n_kv, d_head]``."""
    a = torch.softmax(s, dim=-1) if a is None else a.to(v.dtype)  # [B, L, H, T]
    groups = weights.kv_groups.to(v.device)
    z = torch.einsum("blht,blthe->blhe", a, v[:, :, :, groups])  # [B, L, H, d_head]
    w_o = torch.stack([weights.W_O(la) for la in range(weights.n_layers)]).to(z.dtype)  # [L, H, dh, d]
    return torch.einsum("blhe,lhem->blhm", z, w_o)


# ---- agreement --------------------------------------------------------------------------------------------
def _ranks(x: Tensor) -> Tensor:
    """Ranks along the last dim, ties given their average rank (as Spearman's ρ needs)."""
    less = (x[..., None, :] < x[..., :, None]).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)
    return less.double() + (equal.double() - 1) / 2


def compare_attention(s: Tensor, a: Tensor, last: Tensor, source: Tensor) -> dict[str, Tensor]:
    """Per prompt and head (``[B, L, H]`` each): ``top1`` (the static and real first positions agree),
    ``top1_no_first`` (the same over positions 1..last), ``spearman`` (ρ over positions 0..last; NaN for a
    prompt of one token), and the attention on the source position, ``static_on_source`` (softmax of the static
    logits) and ``real_on_source``, from static logits ``s`` and real weights ``a`` ``[B, L, H, T]``."""
    T = s.shape[-1]
    valid = torch.arange(T, device=s.device)[None, None, None] <= last[:, None, None, None]  # [B, 1, 1, T]
    s = s.masked_fill(~valid, float("-inf"))
    a = a.masked_fill(~valid, float("-inf"))
    top1 = (s.argmax(-1) == a.argmax(-1)).float()
    top1_rest = (s[..., 1:].argmax(-1) == a[..., 1:].argmax(-1)).float()
    rho = []
    for b in range(s.shape[0]):
        n = int(last[b]) + 1
        rs, ra = _ranks(s[b, ..., :n].double()), _ranks(a[b, ..., :n].double())
        rs, ra = rs - rs.mean(-1, keepdim=True), ra - ra.mean(-1, keepdim=True)
        den = (rs.pow(2).sum(-1) * ra.pow(2).sum(-1)).sqrt()
        rho.append((rs * ra).sum(-1) / den)
    rows = torch.arange(s.shape[0], device=s.device)
    on_source = torch.softmax(s, -1)[rows, :, :, source].float()
    return {"top1": top1, "top1_no_first": top1_rest, "spearman": torch.stack(rho).float(),
            "static_on_source": on_source, "real_on_source": a[rows, :, :, source].float()}


# ---- one set of prompts --------------------------------------------------------------------------------------
@torch.inference_mode()
def run_prompts(loaded, qmap: QKMap, prompts: Sequence[Prompt], targets: Sequence[int] | None, *,
                ov_representation: str, columns: Columns | None = None, rank_cap: int = 10, pad: int = 0,
                batch_size: int = 64, memory_budget_mb: float = 512.0,
                attention: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
    """Agreement ``[n, L, H]`` per measure and, with ``targets``, the target ranks ``[n, L, H]`` (int16, exact below
    ``rank_cap``) of the joint prediction (``joint_rank``) and of its attention oracle (``oracle_rank``: the same OV
    rows mixed by the head's real attention weights, a control that separates the QK map's errors from the
    mixture's) for ``prompts``. ``attention``: each batch's real attention rows as the dynamic scores' pass read
    them (:mod:`maps_utils.dynamic.readouts`, the same batches); None runs the model."""
    w = loaded.weights
    out: dict[str, list[Tensor]] = {}
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        ids, last, source = pad_batch(batch, pad, w.device)
        real = attention[b].to(w.device) if attention is not None else real_attention(loaded.model, w, ids, last)
        s, v = static_batch(qmap, ids, last, ov_representation)
        for name, value in compare_attention(s.float(), real, last, source).items():
            out.setdefault(name, []).append(value.cpu())
        if targets is None:
            continue
        tgt = torch.as_tensor(targets[start:start + batch_size], device=w.device)
        tgt = tgt[:, None].expand(len(batch), w.n_layers * w.n_heads).reshape(-1)
        for name, weights_ in (("joint_rank", None), ("oracle_rank", real)):  # static weights; the real ones
            rows = joint_writes(w, s, v, weights_).reshape(-1, w.d_model)
            top, _ = ranks_of_targets(rows.to(columns.cols.dtype), tgt, columns, rank_cap, memory_budget_mb)
            out.setdefault(name, []).append(top.view(len(batch), w.n_layers, w.n_heads).to(torch.int16).cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def distractor_prompts(tokenizer, template: str, sources_ids: Sequence[Sequence[int]],
                       joiner: str = " and") -> list[Prompt]:
    """Prompts whose source is preceded by a distractor entity of the same relation: ``<D> and <X>`` in the
    template (D the next pair's source, cyclically); the source position stays X's last token."""

    join = list(tokenizer(joiner, add_special_tokens=False)["input_ids"])
    n = len(sources_ids)
    mixed = [list(sources_ids[(i + 1) % n]) + join + list(sources_ids[i]) for i in range(n)]
    return build_prompts(tokenizer, template, mixed, space_in_source=True)
