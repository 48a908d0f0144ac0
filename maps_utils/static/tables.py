"""Analyses of a static score table (notebook 01): the category map, the top heads per relation, and whether heads
sharing a KV group implement similar relations."""

from __future__ import annotations

import pandas as pd
import torch

from .scores import TAU

# ---- analyses of a score table ---------------------------------------------------------------------------
CATEGORY_LABELS = ("unclassified", "algorithmic", "knowledge", "linguistic", "translation",
                   "2 categories", "3 categories", "4 categories")


def category_map(table: pd.DataFrame, tau: float = TAU) -> pd.DataFrame:
    """Per head, the categories of the relations it implements (score >= tau), as in the paper's category figure.

    Returns one row per (layer, head) with ``categories`` (sorted tuple) and ``label`` (one of
    :data:`CATEGORY_LABELS`: the single category, "N categories", or "unclassified").
    """
    hit = table[table.score >= tau]
    cats = hit.groupby(["layer", "head"]).category.agg(lambda c: tuple(sorted(set(c))))
    heads = table[["layer", "head"]].drop_duplicates().set_index(["layer", "head"])
    heads["categories"] = cats.reindex(heads.index).apply(lambda c: c if isinstance(c, tuple) else ())
    heads["label"] = heads.categories.apply(
        lambda c: "unclassified" if not c else c[0] if len(c) == 1 else f"{len(c)} categories")
    return heads.reset_index()


def top_heads(table: pd.DataFrame, n: int = 5, tau: float = TAU) -> pd.DataFrame:
    """Per relation: the n best heads (``L.H (score)``), the best score, and how many heads reach tau."""
    rows = []
    for rel, g in table.groupby("relation", sort=False):
        best = g.sort_values("score", ascending=False, kind="stable").head(n)
        rows.append({"relation": rel, "category": g.category.iloc[0], "k": int(g.k.iloc[0]),
                     "n_pairs": int(g.n_pairs.iloc[0]), "max_score": round(g.score.max(), 3),
                     f"heads >= {tau}": int((g.score >= tau).sum()),
                     f"suppression heads >= {tau}": int((g.suppression_score >= tau).sum()),
                     "top heads": ", ".join(f"{r.layer}.{r.head} ({r.score:.2f})" for r in best.itertuples())})
    return pd.DataFrame(rows)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def kv_group_similarity(table: pd.DataFrame, n_perm: int = 2000, seed: int = 0) -> dict:
    """Do heads sharing a KV group implement similar relations? (the paper's Llama-3.1 observation)

    Each head's profile is its vector of relation and suppression scores. The statistic is the mean
    cosine similarity of within-group head pairs minus that of comparison pairs: heads of the same
    layer in other groups when layers have several groups; otherwise (one KV group per layer, e.g.
    Gemma-3-270M) heads of the adjacent layer. The p-value comes from a permutation test that
    reshuffles group membership among the heads being compared (within a layer, or within each pair of
    adjacent layers), so depth effects are kept in the null.
    """
    wide = table.pivot_table(index=["layer", "head"], columns="relation", values=["score", "suppression_score"])
    L, H = int(table.layer.max()) + 1, int(table["head"].max()) + 1
    prof = torch.tensor(wide.values, dtype=torch.float64).view(L, H, -1)
    groups = table.drop_duplicates(["layer", "head"]).sort_values(["layer", "head"]).kv_group.values[:H]
    groups = torch.tensor(groups)
    gen = torch.Generator().manual_seed(seed)
    if len(set(groups.tolist())) > 1:  # several groups per layer: compare within vs between groups, per layer
        same = groups[:, None] == groups[None, :]
        off = ~torch.eye(H, dtype=torch.bool)
        sims = _cos(prof[:, :, None], prof[:, None, :])  # [L, H, H]

        def stat(perm_groups):
            s = perm_groups[..., :, None] == perm_groups[..., None, :]
            return (sims[s & off].mean() - sims[~s & off].mean()).item()

        observed = stat(groups.expand(L, H))
        null = [stat(torch.stack([groups[torch.randperm(H, generator=gen)] for _ in range(L)])) for _ in range(n_perm)]
        within, between = sims[same.expand(L, H, H) & off].mean().item(), sims[~same.expand(L, H, H) & off].mean().item()
        comparison = "same layer, other KV group"
    else:  # one group per layer: within = same layer; comparison = adjacent layer
        blocks = [(la, la + 1) for la in range(0, L - 1, 2)]

        def stat_blocks(assign):
            w, b = [], []
            for (la, lb), a in zip(blocks, assign, strict=True):
                both = torch.cat([prof[la], prof[lb]])[a]  # [2H, R], first H = "layer la"
                s = _cos(both[:, None], both[None, :])
                idx = torch.arange(2 * H)
                first = idx < H
                same_layer = (first[:, None] == first[None, :]) & (idx[:, None] != idx[None, :])
                w.append(s[same_layer])
                b.append(s[first[:, None] != first[None, :]])
            return torch.cat(w).mean().item(), torch.cat(b).mean().item()

        within, between = stat_blocks([torch.arange(2 * H) for _ in blocks])
        observed = within - between
        null = []
        for _ in range(n_perm):
            w, b = stat_blocks([torch.randperm(2 * H, generator=gen) for _ in blocks])
            null.append(w - b)
        comparison = "adjacent layer (one KV group per layer)"
    null_t = torch.tensor(null)
    p = (1 + (null_t >= observed).sum().item()) / (1 + n_perm)
    return {"within_group_similarity": within, "comparison_similarity": between, "difference": observed,
            "comparison": comparison, "p_value": p, "n_permutations": n_perm,
            "null_mean": null_t.mean().item(), "null_sd": null_t.std().item()}
