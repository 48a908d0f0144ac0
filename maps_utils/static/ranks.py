"""Target ranks: where each relation pair's target falls in its source's row of every head's map M.

For head h of layer l, row s of the mapping matrix M = E·W_V·W_O·U is
``m_s = (x_s W_V[g(h)]) (W_O[h] U)`` where x_s is the source representation (the raw embedding, block 0's
MLP branch applied to it, or another of :mod:`maps_utils.static.sources`). No biases, no layer norm before U.
Nothing of size d×d or V×V is ever formed.

**Ranks.** The target's rank in its row is the number of *other* tokens with a strictly larger
entry (ties count in the target's favour; ``torch.topk`` would break them arbitrarily). A relation
hit at k means rank < k; the suppression test is the same on −m_s, i.e. the number of strictly
smaller entries. Ranks are exact up to ``rank_cap`` (a rank equal to the cap means ">= cap"), so
scores for every k <= cap follow from one pass.

**Why it is fast.** A row needs only enough of the vocabulary to see ``rank_cap`` entries above
and below its target; most rows stop after a small fraction of it (:mod:`maps_utils.static.scan`: one fixed random
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

from ..heads import HeadWeights
from . import sources
from .scan import Columns, head_ranks, scan_columns

log = logging.getLogger(__name__)


def check_variant(variant: str) -> None:
    """An :class:`~maps_utils.core.errors.OptionError` unless ``variant`` names a source representation."""
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
        variant: source representation (:mod:`maps_utils.static.sources`; the paper's relation scores: ``first_mlp``).
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
