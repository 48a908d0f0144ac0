"""The paper's reference numbers (transcribed from MAPS-SPEC §3 into ``data/paper/``) and honest comparisons with ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import relations as R

PAPER_DIR_NAME = "paper"


def paper_dir() -> Path:
    return R.default_data_dir().parent / PAPER_DIR_NAME


def dynamic_correlations(sources: str = "single_token", score_type: str = "relation") -> pd.DataFrame:
    """The paper's static-vs-dynamic Pearson r per relation and model: relation, model, r_without, r_with, max_static."""
    table = pd.read_csv(paper_dir() / "dynamic_correlation.csv")
    sel = table[(table.sources == sources) & (table.score_type == score_type)]
    if sel.empty:
        raise ValueError(f"No paper numbers for sources={sources!r}, score_type={score_type!r}.")
    return sel.drop(columns=["sources", "score_type"]).reset_index(drop=True)


def dynamic_summary(sources: str = "single_token", score_type: str = "relation") -> pd.DataFrame:
    """Per paper model: number of relations and mean / min / max r without and with context."""
    g = dynamic_correlations(sources, score_type).groupby("model", sort=False)
    return pd.DataFrame({
        "relations": g.size(),
        "mean r w/o": g.r_without.mean(), "min r w/o": g.r_without.min(), "max r w/o": g.r_without.max(),
        "mean r w/": g.r_with.mean(), "min r w/": g.r_with.min(), "max r w/": g.r_with.max(),
    }).round(3)


def side_by_side(ours: pd.DataFrame, sources: str = "single_token", score_type: str = "relation",
                 models: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Our ``r w/o / r w/ (max static)`` cells (from :func:`maps_utils.dynamic.paper_style`) beside the paper's."""
    paper = dynamic_correlations(sources, score_type)
    models = models or tuple(dict.fromkeys(paper.model))
    out = ours[["relation", "cell"]].rename(columns={"cell": "ours"}).set_index("relation")
    for model in models:
        p = paper[paper.model == model].set_index("relation")
        cells = {r: f"{p.r_without[r]:.2f} / {p.r_with[r]:.2f} ({p.max_static[r]:.2f})" for r in p.index}
        out[model] = [cells.get(r, "—") for r in out.index]
    return out.reset_index()


def assessment(ours: pd.DataFrame, sources: str = "single_token", score_type: str = "relation") -> list[str]:
    """Plain sentences comparing our per-relation r (a :func:`maps_utils.dynamic.paper_style` table) with the
    paper's: the mean against the paper's range of model means, the with/without-context gap, and the
    relations where we fall below every paper model or above them."""
    paper = dynamic_correlations(sources, score_type)
    summ = dynamic_summary(sources, score_type)
    lines = []
    for col, pcol, label in (("r w/o context", "mean r w/o", "without"), ("r w/ context", "mean r w/", "with")):
        mean = ours[col].mean()
        lo, hi = summ[pcol].min(), summ[pcol].max()
        where = "within" if lo <= mean <= hi else "below" if mean < lo else "above"
        lines.append(f"Mean r {label} context: {mean:.2f} over {ours[col].notna().sum()} relations, {where} the "
                     f"paper's range of model means ({lo:.2f}–{hi:.2f}).")
    gap = (ours["r w/o context"] - ours["r w/ context"]).mean()
    paper_gap = (paper.r_without - paper.r_with).mean()
    lines.append(f"Context gap (w/o − w/): {gap:+.2f} here, {paper_gap:+.2f} in the paper "
                 f"({'same direction' if np.sign(gap) == np.sign(paper_gap) else 'opposite direction'}).")
    ranges = paper.groupby("relation").r_without.agg(["min", "max"])
    below, above = [], []
    for rel, r in zip(ours.relation, ours["r w/o context"], strict=True):
        if rel not in ranges.index or pd.isna(r):
            continue
        lo, hi = ranges.loc[rel]
        if r < lo:
            below.append(f"{rel} ({r:.2f} vs ≥ {lo:.2f})")
        elif r > hi:
            above.append(f"{rel} ({r:.2f} vs ≤ {hi:.2f})")
    lines.append("Below every paper model (w/o context): " + (", ".join(below) if below else "none") + ".")
    lines.append("Above every paper model (w/o context): " + (", ".join(above) if above else "none") + ".")
    missing = sorted(set(ours.relation[ours["r w/o context"].isna()]))
    if missing:
        lines.append("Undefined r (a constant score vector, e.g. no head ever hits): " + ", ".join(missing) + ".")
    return lines
