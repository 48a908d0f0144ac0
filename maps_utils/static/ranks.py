"""Target ranks: where each relation pair's target falls in its source's row of every head's map M.

For head h of layer l, row s of the mapping matrix M = E·W_V·W_O·U is ``m_s = (x_s W_V[g(h)]) (W_O[h] U)``, where
x_s is the source representation (:mod:`.sources`). No biases, no layer norm before U, and nothing of size d×d or
V×V is ever formed.

**Ranks.** The target's rank in its row is the number of *other* tokens with a strictly larger entry (ties count in
the target's favour; ``torch.topk`` would break them arbitrarily). A relation hit at k means rank < k; the
suppression test is the same on −m_s, i.e. the number of strictly smaller entries. Ranks are exact up to
``rank_cap`` (a rank equal to the cap means ">= cap"), so scores for every k <= cap follow from one pass.

**The scan.** A row needs only enough of the vocabulary to see ``rank_cap`` entries above and below its target, so
the vocabulary is scanned in one fixed random order (early counts are unbiased) in blocks that grow geometrically,
and every row still undecided is scored in the same block. A row whose target sits among the top (or bottom)
``rank_cap`` of its row has to see every column on that side. Nothing cheaper settles it exactly here: a bound from
U's top singular directions (Cauchy–Schwarz on the rest) was measured on Gemma-3's raw copying rows and still left
85–98% of the columns to score with 64–160 of 640 directions, and norm-ordered columns with a Cauchy–Schwarz stop
ended no row early (docs/performance.md).

:func:`ranks_of_targets` scans model-space rows; :func:`head_ranks` scans every head of a layer, in model space
(``w = z W_O[h]`` against U, all heads together) or in head space (``z = x W_V`` against ``W_O[h] U``, inner
dimension d_head, the product built only for the blocks a head's rows still scan), chosen per call
(:func:`pick_space`: head space when d_head <= d_model / 4 and there are enough pairs to repay the product). A
head-space block has the bits of the same columns of the whole ``W_O[h] U`` (matrix products round alike whatever
their width, except a one-column one, which is avoided), so building it per block changes no rank.
:func:`target_ranks` runs it over every layer, with checkpoints.

Everything runs on the device and dtype of the model it is given; nothing touches CUDA at import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.deprecation import renamed_arguments, renamed_attribute
from ..heads import HeadWeights
from ..heads.ov import OVCircuit
from . import sources

SEED = 0  # the scan order's seed; results never depend on it, only the speed does
SPACES = ("auto", "head", "model")
BYTES_PER_ENTRY = 6  # a score (4 B) and two boolean masks
COLUMN_BLOCK = 8192  # rows of U converted at a time when the scan columns are built


def scan_permutation(vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """The fixed random order in which the vocabulary is scanned."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randperm(vocab_size, generator=g).to(device)


@dataclass
class Columns:
    """A column matrix in scan order."""

    cols: Tensor  # [k, V] columns in scan order
    perm: Tensor  # [V] original token id at each scan position
    position: Tensor  # [V] scan position of each original token id


def inverse(perm: Tensor) -> Tensor:
    position = torch.empty_like(perm)
    position[perm] = torch.arange(perm.numel(), device=perm.device)
    return position


def scan_columns(weights, dtype: torch.dtype | None = None) -> Columns:
    """The unembedding U ``[d_model, V]`` in scan order, shared by every row of every call.

    Built from the LM head's rows as stored (memory-mapped for a streamed model), a block of rows at a time, so no
    second whole copy of U is ever held; the same values and layout as ``U[:, perm].contiguous()``, so every product
    over it is unchanged. Kept on ``weights`` for the next call while the unembedding's storage, version counter,
    dtype and device are unchanged (an in-place edit of the weights bumps the version and rebuilds it).
    """
    dtype = dtype or weights.dtype
    w = weights.unembed_stored  # [V, d_model], as stored
    multiplier = weights.spec.logit_multiplier(weights.model)
    version = -1 if w.is_inference() else w._version  # read from an offload under inference_mode: none kept
    # a streamed LM head is read afresh (a new mapping) each time, and never edited in place: the model names it
    key = (id(weights.model) if weights.streamed else w.data_ptr(), version, dtype, weights.device, multiplier)
    cached = getattr(weights, "_scan_columns", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    weights._scan_columns = None  # the old columns go before the new ones are built
    perm = scan_permutation(w.shape[0], weights.device)
    cols = torch.empty((w.shape[1], w.shape[0]), dtype=dtype, device=weights.device)  # [d, V] in scan order
    for start in range(0, w.shape[0], COLUMN_BLOCK):
        rows = w[perm[start:start + COLUMN_BLOCK].to(w.device)].to(device=weights.device, dtype=weights.dtype)
        cols[:, start:start + COLUMN_BLOCK] = (rows if multiplier is None else rows * multiplier).to(dtype).T
    columns = Columns(cols, perm, inverse(perm))
    weights._scan_columns = (key, columns)
    return columns


def _count(scores: Tensor, t: Tensor, need: Tensor, op) -> Tensor:
    """Per row, the entries with ``op(entry, t)``, for the rows in ``need`` only (others: 0). Summed as int32 (a
    block has far fewer than 2³¹ columns), which is 1.6× faster than the default int64 on CPU; when most rows are
    needed, every row is compared (one pass) rather than the needed ones copied out first."""
    n_need = int(need.sum())
    if n_need == need.numel():
        return op(scores, t[:, None]).sum(1, dtype=torch.int32).long()
    out = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    if 2 * n_need > need.numel():
        return op(scores, t[:, None]).sum(1, dtype=torch.int32).long() * need
    idx = need.nonzero().squeeze(1)
    if idx.numel():
        out[idx] = op(scores[idx], t[idx, None]).sum(1, dtype=torch.int32).long()
    return out


def _tally(scores: Tensor, t: Tensor, p: Tensor, start: int, stop: int, need_above: Tensor,
           need_below: Tensor) -> tuple[Tensor, Tensor]:
    """Entries above and below each row's target logit ``t`` in a block of scan positions [start, stop),
    counting only the side still undecided (a row near the top has long passed the cap below it, so most long
    scans need one comparison pass, not two). ``p`` is each row's target scan position: the target's own column
    is no rival, so its count is undone where rounding moved the block's entry off ``t``."""
    n_above = _count(scores, t, need_above, torch.gt)
    n_below = _count(scores, t, need_below, torch.lt)
    mine = ((p >= start) & (p < stop)).nonzero().squeeze(1)
    own = scores[mine, p[mine] - start]
    n_above[mine] -= ((own > t[mine]) & need_above[mine]).long()
    n_below[mine] -= ((own < t[mine]) & need_below[mine]).long()
    return n_above, n_below


Scorer = Callable[[Tensor, int, int], Tensor]
"""``scorer(active, start, stop)``: the scores ``[len(active), stop - start]`` of the active rows over scan
positions [start, stop)."""


def scan(scorer: Scorer, t: Tensor, pos: Tensor, V: int, rank_cap: int, memory_budget_mb: float,
         first_chunk: int = 512, growth: float = 1.5) -> tuple[Tensor, Tensor]:
    """``(top, bottom)`` capped ranks ``[R]`` of R rows with target logits ``t`` at scan positions ``pos``."""
    R = t.shape[0]
    above = torch.zeros(R, dtype=torch.int64, device=t.device)
    below = torch.zeros(R, dtype=torch.int64, device=t.device)
    budget = max(1, int(memory_budget_mb * 2**20 / BYTES_PER_ENTRY))
    block = max(1, min(R, budget // first_chunk))
    for r0 in range(0, R, block):
        active = torch.arange(r0, min(R, r0 + block), device=t.device)
        start, chunk = 0, float(first_chunk)
        while active.numel() and start < V:
            stop = min(V, start + int(chunk), start + max(1, budget // active.numel()))
            n_above, n_below = _tally(scorer(active, start, stop), t[active], pos[active], start, stop,
                                      above[active] < rank_cap, below[active] < rank_cap)
            above[active] += n_above
            below[active] += n_below
            done = (above[active] >= rank_cap) & (below[active] >= rank_cap)
            active = active[~done]
            start, chunk = stop, chunk * growth
    return above.clamp_(max=rank_cap), below.clamp_(max=rank_cap)


@torch.no_grad()
def ranks_of_targets(
    rows: Tensor,
    targets: Tensor,
    columns: Columns,
    rank_cap: int = 100,
    memory_budget_mb: float = 512.0,
    first_chunk: int = 512,
    growth: float = 1.5,
) -> tuple[Tensor, Tensor]:
    """Rank of each row's target from the top and from the bottom of ``rows @ cols``, capped at ``rank_cap``.

    Args:
        rows: ``[R, k]`` row vectors.
        targets: ``[R]`` target token id (original id) of each row.
        columns: the column matrix in scan order (:class:`Columns`).
        rank_cap: ranks >= this are returned as ``rank_cap``.
        memory_budget_mb: bounds the rows x columns block scored at once (about 6 bytes per entry).
        first_chunk, growth: columns in the first block, and the factor by which blocks grow.
    Returns:
        ``(top, bottom)``, each ``[R]`` int64 in ``[0, rank_cap]``.
    """
    pos = columns.position[targets.to(columns.position.device)]  # scan position of each target
    step = max(1, int(memory_budget_mb * 2**20 // (4 * rows.shape[1])))  # rows whose target columns fit the budget
    t = torch.cat([(rows[a:a + step] * columns.cols[:, pos[a:a + step]].T).sum(1)  # [R] the target's own entry
                   for a in range(0, rows.shape[0], step)]) if rows.shape[0] else rows.new_empty(0)

    def scorer(active: Tensor, start: int, stop: int):
        return rows[active] @ columns.cols[:, start:stop]  # [A, C]

    return scan(scorer, t, pos, columns.cols.shape[1], rank_cap, memory_budget_mb, first_chunk, growth)


def pick_space(compute_space: str, d_model: int, d_head: int, n_pairs: int) -> str:
    """``head`` or ``model`` for a call with ``n_pairs`` rows per head. Head space pays a d_head × d_model product
    per scanned column of each head, then costs d_head per entry instead of d_model; with about 5% of the
    vocabulary scanned per row, ``auto`` picks it when d_head <= d_model / 4 and beyond this many pairs."""
    if compute_space not in SPACES:
        raise ValueError(f"Unknown compute space '{compute_space}'; use one of {', '.join(SPACES)}.")
    if compute_space == "auto":
        return "head" if d_head * 4 <= d_model and n_pairs > 20 * d_head * d_model / (d_model - d_head) else "model"
    return compute_space


def _wide(w_o: Tensor, cols: Tensor) -> Tensor:
    """``w_o @ cols`` with the bits of the same columns of any wider product: a one-column product would take a
    matrix-vector path that rounds differently, so it is computed two wide."""
    if cols.shape[1] != 1:
        return w_o @ cols
    return (w_o @ torch.cat([cols, cols], 1))[:, :1]


@torch.no_grad()
def head_ranks(
    ov: OVCircuit,
    x: Tensor,
    targets: Tensor,
    columns: Columns,
    rank_cap: int = 100,
    memory_budget_mb: float = 512.0,
    compute_space: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(top, bottom)`` ranks ``[H, n]`` of the rows ``(x W_V[g(h)]) W_O[h] U`` of every head of one layer.

    ``x`` is ``[n, d_model]`` (the sources), ``targets`` ``[n]``, ``columns`` U in scan order. Model space scores
    every head's rows ``w = z W_O[h]`` against U together; head space scores each head's ``z`` against
    ``W_O[h] U``, built block by block for the columns its rows still scan (:func:`pick_space`).
    """
    H, d_head, d_model = ov.W_O.shape
    n = targets.numel()
    if pick_space(compute_space, d_model, d_head, n) == "model":
        y = ov.head_values(x)  # [H, n, dh]
        per = max(1, int(memory_budget_mb * 2**20 // (4 * max(n, 1) * d_model)))  # heads whose writes fit the budget
        tops, bottoms = [], []
        for h0 in range(0, H, per):  # [h, n, d] writes of a few heads at a time: memory stays within the budget
            w = torch.einsum("hne,hem->hnm", y[h0:h0 + per], ov.W_O[h0:h0 + per]).reshape(-1, d_model)
            top, bottom = ranks_of_targets(w, targets.repeat(w.shape[0] // max(n, 1)), columns, rank_cap,
                                           memory_budget_mb)
            tops.append(top)
            bottoms.append(bottom)
        return torch.cat(tops).view(H, n), torch.cat(bottoms).view(H, n)
    z = ov.values(x)  # [G, n, dh], shared per KV group
    pos = columns.position[targets.to(columns.position.device)]
    tops, bottoms = [], []
    for h in range(H):
        rows, w_o = z[int(ov.groups[h])], ov.W_O[h]
        t = (rows * _wide(w_o, columns.cols[:, pos]).T).sum(1)  # [n] the target's own entry, C_h = W_O[h] U at pos

        def scorer(active: Tensor, start: int, stop: int, rows=rows, w_o=w_o):
            return rows[active] @ _wide(w_o, columns.cols[:, start:stop])  # [A, dh] @ [dh, C]

        top, bottom = scan(scorer, t, pos, columns.cols.shape[1], rank_cap, memory_budget_mb)
        tops.append(top)
        bottoms.append(bottom)
    return torch.stack(tops), torch.stack(bottoms)


# ---- every head of every layer ------------------------------------------------------------------------------
log = logging.getLogger(__name__)


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
    representation: str  # the sources' representation (:mod:`maps_utils.static.sources`)
    rank_cap: int

    variant = renamed_attribute("variant", "representation")

    def hits(self, k: int, suppression: bool = False) -> Tensor:
        """Boolean ``[L, H, n]``: target in the top-k of the row (of −row with ``suppression``)."""
        if k > self.rank_cap:
            raise ValueError(f"k={k} exceeds rank_cap={self.rank_cap}; recompute with a larger rank_cap.")
        return (self.bottom if suppression else self.top) < k

    def scores(self, k: int, suppression: bool = False) -> Tensor:
        """``[L, H]`` fraction of pairs hit at k: the MAPS relation (or suppression) score."""
        return self.hits(k, suppression).float().mean(-1)


@renamed_arguments(variant="representation")
@torch.no_grad()
def target_ranks(
    weights: HeadWeights,
    source_ids: Sequence[int] | Tensor,
    target_ids: Sequence[int] | Tensor,
    *,
    representation: str = "first_mlp",
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
        representation: source representation (:mod:`maps_utils.static.sources`; the paper's relation scores:
            ``first_mlp``).
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
    sources.check(representation)
    device = weights.device
    dtype = dtype or weights.dtype
    src = torch.as_tensor(source_ids, device=device)
    tgt = torch.as_tensor(target_ids, device=device)
    L, H, n = weights.n_layers, weights.n_heads, src.numel()
    if out is None:
        out = RankResult(torch.full((L, H, n), rank_cap, dtype=torch.int16),
                         torch.full((L, H, n), rank_cap, dtype=torch.int16), representation, rank_cap)
    model_columns = scan_columns(weights, dtype)
    todo = list(range(L)) if layers is None else list(layers)
    xs = sources.SourceVectors(weights, src, representation, layers=todo, prefix=prefix, dtype=dtype)
    for layer in tqdm(todo, desc=f"ranks ({representation})", disable=not progress or len(todo) < 2):
        t, b = layer_ranks(weights, layer, xs.layer(layer), tgt, rank_cap=rank_cap, compute_space=compute_space,
                           memory_budget_mb=memory_budget_mb, model_columns=model_columns)
        out.top[layer], out.bottom[layer] = t.to(torch.int16).cpu(), b.to(torch.int16).cpu()
        if on_layer is not None:
            on_layer(layer, out)
    return out
