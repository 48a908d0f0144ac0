"""Which heads the causal experiment removes: a relation's heads (top-m by static score, capped), random heads for
the baseline, and the control tasks whose heads barely overlap (MAPS-SPEC §1.5)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .passes import Head, seeded_rng


# ---- choosing heads ------------------------------------------------------------------------------------
def max_relation_heads(n_heads_total: int) -> int:
    """The paper's cap on relation heads by model size: < 300 heads → 30, < 500 → 50, < 1000 → 100,
    < 1500 → 150, otherwise 250."""
    for limit, cap in ((300, 30), (500, 50), (1000, 100), (1500, 150)):
        if n_heads_total < limit:
            return cap
    return 250


def relation_heads(score_map: Tensor | np.ndarray, m: int | None = None) -> list[Head]:
    """The top-``m`` heads of a ``[L, H]`` static score map that score > 0, best first (a stable sort over the
    flattened layer × head order, so ties keep the lower layer/head first); ``m`` defaults to the cap."""
    s = torch.as_tensor(np.asarray(score_map), dtype=torch.float64)
    L, H = s.shape
    m = max_relation_heads(L * H) if m is None else m
    flat = s.flatten()
    order = torch.argsort(-flat, stable=True)
    order = order[flat[order] > 0][:m]
    return [(int(i) // H, int(i) % H) for i in order]


def random_heads(n_layers: int, n_heads: int, exclude: Sequence[Head], count: int, n_samples: int, seed: int,
                 name: str) -> list[list[Head]]:
    """``n_samples`` random orders of ``count`` heads drawn without replacement from the heads not in ``exclude``
    (fewer when fewer are left), seeded by ``seed`` and ``name``."""
    banned = set(map(tuple, exclude))
    pool = [(layer, h) for layer in range(n_layers) for h in range(n_heads) if (layer, h) not in banned]
    rng = seeded_rng(seed, name, 0)
    size = min(count, len(pool))
    return [[pool[i] for i in rng.choice(len(pool), size=size, replace=False)] for _ in range(n_samples)]


def overlap(main: Sequence[Head], other: Sequence[Head]) -> float:
    """|main ∩ other| / |main| (0 when ``main`` is empty)."""
    main_set = set(map(tuple, main))
    return len(main_set & set(map(tuple, other))) / len(main_set) if main_set else 0.0


def select_controls(main: str, heads: dict[str, Sequence[Head]], base: dict[str, float], seed: int, *,
                    max_overlap: float = 0.15, max_base_gap: float = 0.2, max_controls: int = 5) -> list[str]:
    """Control tasks for ``main``: the other relations of ``heads`` (the valid setups) in a seeded random order,
    kept while their relation heads overlap ``main``'s by less than ``max_overlap`` and their base accuracy is
    within ``max_base_gap`` of ``main``'s, up to ``max_controls``."""
    candidates = sorted(r for r in heads if r != main)
    order = [candidates[i] for i in seeded_rng(seed, main, 1).permutation(len(candidates))]
    chosen = []
    for other in order:
        if len(chosen) == max_controls:
            break
        if overlap(heads[main], heads[other]) < max_overlap and abs(base[other] - base[main]) <= max_base_gap + 1e-12:
            chosen.append(other)
    return chosen


# ---- the experiment ------------------------------------------------------------------------------------
