"""Static MAPS engine: relation and suppression scores, target ranks, top-k mappings and saliency.

For head h of layer l, row s of the mapping matrix M = E·W_V·W_O·U is
``m_s = (x_s W_V[g(h)]) (W_O[h] U)`` where x_s is the source representation (the raw embedding, block 0's
MLP branch applied to it, or another of :mod:`maps_utils.sources`). No biases, no layer norm before U.
Nothing of size d×d or V×V is ever formed.

**Ranks.** The target's rank in its row is the number of *other* tokens with a strictly larger
entry (ties count in the target's favour; ``torch.topk`` would break them arbitrarily). A relation
hit at k means rank < k; the suppression test is the same on −m_s, i.e. the number of strictly
smaller entries. Ranks are exact up to ``rank_cap`` (a rank equal to the cap means ">= cap"), so
scores for every k <= cap follow from one pass.

**Why it is fast.** A row needs only enough of the vocabulary to see ``rank_cap`` entries above
and below its target; most rows stop after a small fraction of it (:mod:`maps_utils.scan`: one fixed random
scan order, blocks that grow geometrically, the undecided rows scored together in each block). Rows run
in model space (``w = z W_O[h]`` against U) or in head space (``z = x W_V`` against ``W_O[h] U``, inner dimension
d_head, built only for the blocks still scanned); ``auto`` picks head space when d_head <= d_model / 4 and there
are enough pairs to repay the product.

Everything runs on the device and dtype of the model it is given; nothing touches CUDA at import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import sources
from .heads import HeadWeights
from .scan import SEED, SPACES, Columns, head_ranks, ranks_of_targets, scan_columns, scan_permutation  # noqa: F401

log = logging.getLogger(__name__)


def check_variant(variant: str) -> None:
    """An :class:`~maps_utils.errors.OptionError` unless ``variant`` names a source representation."""
    sources.check(variant)


@torch.no_grad()
def head_rows(weights: HeadWeights, layer: int, x: Tensor) -> Tensor:
    """``[n_heads, n, d_model]``: ``w = (x W_V[g(h)]) W_O[h]`` for every query head of ``layer`` (no biases);
    row s of M is ``w_s @ U``."""
    return weights.ov(layer).to(x.dtype).writes(x)


@torch.no_grad()
def layer_ranks(
    weights: HeadWeights,
    layer: int,
    x: Tensor,
    targets: Tensor,
    *,
    rank_cap: int = 100,
    compute_space: str = "auto",
    memory_budget_mb: float = 512.0,
    model_columns: Columns | None = None,
) -> tuple[Tensor, Tensor]:
    """``(top, bottom)`` target ranks, each ``[n_heads, n]``, for every head of ``layer``.

    ``x`` is ``[n, d_model]`` (the sources' representations for this layer), ``targets`` ``[n]``.
    """
    columns = model_columns or scan_columns(weights, x.dtype)
    return head_ranks(weights.ov(layer).to(x.dtype), x, targets, columns, rank_cap, memory_budget_mb, compute_space)


@dataclass
class RankResult:
    """Target ranks of a set of (source, target) pairs for every head: ``[n_layers, n_heads, n]`` each."""

    top: Tensor
    bottom: Tensor
    variant: str
    rank_cap: int

    def hits(self, k: int, suppression: bool = False) -> Tensor:
        """Boolean ``[L, H, n]``: target in the top-k of the row (of −row with ``suppression``)."""
        if k > self.rank_cap:
            raise ValueError(f"k={k} exceeds rank_cap={self.rank_cap}; recompute with a larger rank_cap.")
        return (self.bottom if suppression else self.top) < k

    def scores(self, k: int, suppression: bool = False) -> Tensor:
        """``[L, H]`` fraction of pairs hit at k: the MAPS relation (or suppression) score."""
        return self.hits(k, suppression).float().mean(-1)


@torch.no_grad()
def target_ranks(
    weights: HeadWeights,
    source_ids: Sequence[int] | Tensor,
    target_ids: Sequence[int] | Tensor,
    *,
    variant: str = "first_mlp",
    rank_cap: int = 100,
    compute_space: str = "auto",
    memory_budget_mb: float = 512.0,
    layers: Sequence[int] | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    out: RankResult | None = None,
    on_layer=None,
    prefix: Sequence[int] | None = None,
) -> RankResult:
    """Target ranks of every (source, target) pair in every head (see the module docstring).

    Args:
        weights: the model's :class:`HeadWeights` (its device is used).
        source_ids, target_ids: token ids of the pairs (e.g. from ``relations.filter_single_token``).
        variant: source representation (:mod:`maps_utils.sources`; the paper's relation scores: ``first_mlp``).
        prefix: the tokens before the source in a context-free pass (default: the model's BOS).
        rank_cap: ranks are exact below it.
        compute_space: ``auto``, ``head`` or ``model`` (speed only; the results are identical).
        memory_budget_mb: bounds the largest block of scores held at once.
        layers: a subset of layers (default all); other layers' ranks are returned as ``rank_cap``.
        dtype: compute dtype (default the model's; float32 is the fast one on CPU).
        out: fill this result's tensors in place (to resume: pass the finished layers' result and
            the remaining ``layers``).
        on_layer: called as ``on_layer(layer, result)`` after each layer (checkpointing).
    """
    check_variant(variant)
    device = weights.U.device
    dtype = dtype or weights.U.dtype
    src = torch.as_tensor(source_ids, device=device)
    tgt = torch.as_tensor(target_ids, device=device)
    L, H, n = weights.n_layers, weights.n_heads, src.numel()
    if out is None:
        out = RankResult(torch.full((L, H, n), rank_cap, dtype=torch.int16),
                         torch.full((L, H, n), rank_cap, dtype=torch.int16), variant, rank_cap)
    model_columns = scan_columns(weights, dtype)
    todo = list(range(L)) if layers is None else list(layers)
    xs = sources.SourceVectors(weights, src, variant, layers=todo, prefix=prefix, dtype=dtype)
    for layer in tqdm(todo, desc=f"ranks ({variant})", disable=not progress or len(todo) < 2):
        t, b = layer_ranks(weights, layer, xs.layer(layer), tgt, rank_cap=rank_cap, compute_space=compute_space,
                           memory_budget_mb=memory_budget_mb, model_columns=model_columns)
        out.top[layer], out.bottom[layer] = t.to(torch.int16).cpu(), b.to(torch.int16).cpu()
        if on_layer is not None:
            on_layer(layer, out)
    return out


# ---- top-k mappings and saliency ---------------------------------------------------------------------
@torch.no_grad()
def top_mappings(
    weights: HeadWeights,
    layer: int,
    head: int,
    token_ids: Sequence[int] | Tensor,
    k: int = 5,
    *,
    variant: str = "first_mlp",
    suppression: bool = False,
    chunk: int = 32768,
    prefix: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k targets of the given sources' rows of M for one head: ``(values, ids)``, each ``[n, k]``.

    The vocabulary is processed in chunks, so memory stays at n × chunk.
    """
    x = sources.source_vectors(weights, token_ids, variant, layer, prefix=prefix)
    w = weights.ov(layer).head_write(head, x)  # [n, d]
    if suppression:
        w = -w
    best_v = w.new_full((w.shape[0], 0), float("-inf"))
    best_i = torch.zeros((w.shape[0], 0), dtype=torch.long, device=w.device)
    U = weights.U
    for start in range(0, U.shape[1], chunk):
        s = w @ U[:, start : start + chunk]
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_v, idx = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, idx)
    return best_v, best_i


@torch.no_grad()
def saliency(
    weights: HeadWeights,
    *,
    variant: str = "first_mlp_all",
    chunk: int = 8192,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    prefix: Sequence[int] | None = None,
) -> Tensor:
    """``[n_layers, n_heads, V]`` norm amplification ‖x_t W_VO‖ / ‖x_t‖ of every token for every head.

    Uses ‖y W_O‖² = y (W_O W_Oᵀ) yᵀ with y = x W_V, so W_VO (d×d) is never formed. The default
    variant is the paper's salient-operations choice (MLP0 for every layer, MAPS-SPEC §8.1). A forward-pass
    representation (``context_free``) runs one batched pass per chunk of the vocabulary.
    """
    check_variant(variant)
    dtype = dtype or weights.U.dtype
    L, H, V = weights.n_layers, weights.n_heads, weights.vocab_size
    out = torch.empty((L, H, V), dtype=torch.float32)
    ovs = [weights.ov(layer).to(dtype) for layer in range(L)]
    gram = [ov.out_gram() for ov in ovs]  # [H, dh, dh] per layer
    device = weights.U.device
    for start in tqdm(range(0, V, chunk), desc=f"saliency ({variant})", disable=not progress):
        ids = torch.arange(start, min(V, start + chunk), device=device)
        xs = sources.SourceVectors(weights, ids, variant, prefix=prefix, dtype=dtype)
        for layer in range(L):
            x = xs.layer(layer)
            y = ovs[layer].head_values(x)  # [H, n, dh]
            sq = torch.einsum("hne,hef,hnf->hn", y, gram[layer], y).clamp_min(0)
            xn = torch.linalg.vector_norm(x, dim=1).clamp_min(torch.finfo(dtype).tiny)
            out[layer, :, start : start + ids.numel()] = (sq.sqrt() / xn).float().cpu()
    return out


@torch.no_grad()
def salient_operations(
    weights: HeadWeights,
    tokenizer=None,
    *,
    n_tokens: int = 15,
    n_mappings: int = 5,
    variant: str = "first_mlp_all",
    heads_subset: Sequence[tuple[int, int]] | None = None,
    saliency_scores: Tensor | None = None,
    progress: bool = True,
):
    """Each head's salient operations (MAPS-SPEC §1.7, §4.1): its top ``n_tokens`` tokens by norm
    amplification and, for each, the top ``n_mappings`` targets of its row of M.

    Returns a tidy DataFrame (layer, head, rank, token_id, token, saliency, mapping_ids, mappings).
    ``saliency_scores`` (from :func:`saliency`) is reused when given; tokens are decoded when a
    tokenizer is given. The default variant is the paper's for this analysis (MLP0 for all layers).
    """
    import pandas as pd

    sal = saliency(weights, variant=variant, progress=progress) if saliency_scores is None else saliency_scores
    pairs = heads_subset or [(la, h) for la in range(weights.n_layers) for h in range(weights.n_heads)]
    rows = []
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
    for layer, h in pairs:
        values, ids = torch.topk(sal[layer, h], n_tokens)
        _, maps = top_mappings(weights, layer, h, ids.to(weights.U.device), n_mappings, variant=variant)
        for rank, (tid, value, mapped) in enumerate(zip(ids.tolist(), values.tolist(), maps.tolist(), strict=True)):
            rows.append({"layer": layer, "head": h, "rank": rank, "token_id": tid, "token": decode(tid),
                         "saliency": value, "mapping_ids": mapped, "mappings": [decode(m) for m in mapped]})
    return pd.DataFrame(rows)
