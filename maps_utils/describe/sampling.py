"""Which heads to describe and study: a seeded sample stratified by layer quartile, and per-quartile tables.

The paper's salient-operation charts bin heads by layer quartile ([0, L/4), [L/4, L/2), …); notebook 04 describes a
sample stratified over those bins, and notebook 05 draws its study items the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

DEFAULT_SAMPLE = 40  # heads described by default: stratified by layer quartile (the paper described ~135 per model)


def layer_quartile(layer: int, n_layers: int) -> int:
    """0–3: the quarter of the depth ``layer`` falls in (bins [0, L/4), [L/4, L/2), … as the paper's charts)."""
    return min(3, 4 * int(layer) // int(n_layers))


def quartile_labels(n_layers: int) -> list[str]:
    """``["[0,8)", "[8,15)", …]``: the layer range of each quartile (by :func:`layer_quartile`); "(none)" for an
    empty quartile of a model with fewer than four layers."""
    members = [[la for la in range(n_layers) if layer_quartile(la, n_layers) == q] for q in range(4)]
    return [f"[{m[0]},{m[-1] + 1})" if m else "(none)" for m in members]


def select_heads(n_layers: int, n_heads: int, heads="sample", *, n: int = DEFAULT_SAMPLE,
                 seed: int = 0) -> list[tuple[int, int]]:
    """The heads to describe, sorted by (layer, head).

    ``heads`` is ``"all"``; ``"sample"`` (``n`` heads stratified by layer quartile: ``n // 4`` from each, the
    remainder to the first quartiles, drawn with ``seed``); an int (a sample of that many); or a list of
    ``(layer, head)`` pairs.
    """
    every = [(la, h) for la in range(n_layers) for h in range(n_heads)]
    if isinstance(heads, str) and heads.strip().startswith("["):  # a list passed as text (papermill -p)
        try:
            heads = json.loads(heads)
        except ValueError:
            raise ValueError(f"heads={heads!r} is not a JSON list of [layer, head] pairs.") from None
    if isinstance(heads, str) and heads == "all":
        return every
    if isinstance(heads, str) and heads != "sample":
        raise ValueError(f'heads={heads!r}: use "all", "sample", a number of heads or a list of (layer, head) pairs.')
    if not isinstance(heads, str) and isinstance(heads, Iterable):
        heads = list(heads)
        if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in heads):
            raise ValueError(f"heads={heads!r}: give a list of (layer, head) pairs, e.g. [[2, 3], [21, 4]].")
        chosen = sorted({(int(la), int(h)) for la, h in heads})
        bad = [p for p in chosen if not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads)]
        if bad or not chosen:
            raise ValueError(f"heads: {bad or 'an empty list'} — every (layer, head) must lie in "
                             f"{n_layers} layers x {n_heads} heads.")
        return chosen
    n = int(heads) if not isinstance(heads, str) else int(n)
    if n < 1:
        raise ValueError(f"heads: a sample needs at least one head (got {n}).")
    if n >= len(every):
        return every
    by_q = [[p for p in every if layer_quartile(p[0], n_layers) == q] for q in range(4)]
    return sorted(stratified_pick(by_q, n, seed))


def stratified_pick(groups: Sequence[Sequence], n: int, seed: int = 0) -> list:
    """``n`` items drawn without replacement, as evenly as possible over ``groups`` (``n // len(groups)`` each,
    the remainder to the first groups); a group with too few items gives what it has and the shortfall goes to
    the others in order. Seeded; the result keeps group order."""
    rng = np.random.default_rng(seed)
    g = len(groups)
    want = [n // g + (1 if q < n % g else 0) for q in range(g)]
    take = [min(w, len(b)) for w, b in zip(want, groups, strict=True)]
    short = n - sum(take)
    for q in range(g):
        extra = min(short, len(groups[q]) - take[q])
        take[q] += extra
        short -= extra
    chosen = []
    for q in range(g):
        idx = rng.choice(len(groups[q]), size=take[q], replace=False)
        chosen += [groups[q][i] for i in idx]
    return chosen



def quartile_table(rows: pd.DataFrame, field: str, categories: Sequence[str], n_layers: int) -> pd.DataFrame:
    """Per layer quartile (index 0-3): ``layers``, the count ``n`` and the share of each value of ``field``."""
    counts = pd.crosstab(rows.quartile, rows[field]).reindex(index=range(4), columns=list(categories), fill_value=0)
    n = counts.sum(axis=1)
    out = counts.div(n.replace(0, np.nan), axis=0)
    out.insert(0, "n", n)
    out.insert(0, "layers", quartile_labels(n_layers))
    return out
