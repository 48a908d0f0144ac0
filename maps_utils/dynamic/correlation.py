"""How well static scores predict dynamic ones: Pearson r over heads × templates (the static map tiled once per
template, MAPS-SPEC §8.13), the paper's table layout and summary rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.deprecation import renamed_arguments, renamed_function
from ..core.manifest import build_manifest
from ..core.store import RunOptions, write_table
from ..static.scores import static_scores
from ..static.sources import deepest_first, default_prefix, parse, shared_bases
from .scores import CONTEXTS, DynamicScores, multi_token_scores


# ---- correlation with the static scores --------------------------------------------------------------
def pearson(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (t distribution with n − 2 degrees of freedom, as scipy's).

    Returns ``(nan, nan)`` when either vector is constant or there are fewer than 3 points.
    """
    from scipy.special import stdtr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two vectors of one length, got {x.shape} and {y.shape}")
    n = x.size
    if n < 3:
        return float("nan"), float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = math.sqrt((dx * dx).sum()), math.sqrt((dy * dy).sum())
    if sx == 0 or sy == 0:
        return float("nan"), float("nan")
    r = float(np.clip((dx * dy).sum() / (sx * sy), -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return r, float(2 * stdtr(n - 2, -abs(t)))


def correlations(static, dynamic: DynamicScores, k: int | None = None) -> pd.DataFrame:
    """Per relation, score type (relation / suppression) and context: Pearson r and p between static and
    dynamic scores over heads × templates (the static ``[L, H]`` map tiled once per template), both at the
    relation's k (or ``k``).

    ``static`` is a :class:`~maps_utils.static.scores.StaticScores`; relations without a static score are left out.
    Columns: relation, category, score_type, context, r, p, n_points, max_static, max_dynamic, n_prompts, k.
    """
    rows = []
    static_names = {r.name for r in static.relations}
    for rel in dynamic.relations:
        if rel.name not in static_names:
            continue
        kk = k or rel.k
        for score_type, supp in (("relation", False), ("suppression", True)):
            s_map = static.score_map(rel.name, kk, suppression=supp).flatten()
            for context in CONTEXTS:
                d = rel.scores(kk, context, suppression=supp)  # [T, L, H]
                xs = s_map.repeat(d.shape[0]).numpy()
                r, p = pearson(xs, d.flatten().numpy())
                rows.append({"relation": rel.name, "category": rel.category, "score_type": score_type,
                             "context": context, "r": r, "p": p, "n_points": xs.size,
                             "max_static": float(s_map.max()), "max_dynamic": float(d.max()),
                             "n_prompts": rel.n, "k": kk})
    return pd.DataFrame(rows)


def paper_style(corr: pd.DataFrame, score_type: str = "relation") -> pd.DataFrame:
    """The paper's table layout: one row per relation, ``r w/o / r w/ (max static)``."""
    g = corr[corr.score_type == score_type]
    rows = []
    for rel, sub in g.groupby("relation", sort=False):
        by = sub.set_index("context")
        rows.append({"relation": rel, "category": sub.category.iloc[0],
                     "r w/o context": by.loc["without", "r"], "r w/ context": by.loc["with", "r"],
                     "max static": by.loc["without", "max_static"],
                     "cell": f"{by.loc['without', 'r']:.2f} / {by.loc['with', 'r']:.2f} "
                             f"({by.loc['without', 'max_static']:.2f})"})
    return pd.DataFrame(rows)


def correlation_summary(corr: pd.DataFrame) -> pd.DataFrame:
    """Mean / min / max of r over relations of a :func:`correlations` table, per score type and context (the
    paper's summary row); relations whose r is undefined (a constant score vector) are counted separately."""
    rows = []
    for (score_type, context), g in corr.groupby(["score_type", "context"], sort=False):
        r = g.r.dropna()
        rows.append({"score_type": score_type, "context": context, "relations": len(r),
                     "undefined": int(g.r.isna().sum()), "mean r": r.mean(), "min r": r.min(), "max r": r.max()})
    return pd.DataFrame(rows)


# ---- what notebook 02 shows ---------------------------------------------------------------------------
@renamed_arguments(variants="representations")
def compare_representations(loaded, dynamic: DynamicScores, representations, *, static=None, relations=None,
                            k: int | None = None, run: RunOptions = RunOptions()) -> pd.DataFrame:
    """Mean r per source representation of the static scores (columns) and per score type and context (rows): the
    representation whose static scores correlate better with the heads' outputs at inference describes them better.
    ``static`` is reused for its own representation; the others are scored (or read from the results store) only to
    the largest k the correlations read (the same scores at k, sooner: a smaller rank cap stops more rows early)."""

    rows, cap = [], k or max(r.k for r in dynamic.relations)  # the k the correlations read
    with shared_bases():  # each base representation (and forward pass) once for all of them
        for rep in deepest_first(representations):
            st = static if static is not None and static.representation == rep else static_scores(
                loaded, relations, representation=rep, rank_cap=cap, run=run)  # ranks past k are not read
            for _, r in correlation_summary(correlations(st, dynamic, k=k)).iterrows():
                rows.append({"representation": rep, "score": r["score_type"], "context": r["context"],
                             "mean r": round(r["mean r"], 3)})
    table = pd.DataFrame(rows).pivot_table(index=["score", "context"], columns="representation", values="mean r")
    return table[list(dict.fromkeys(representations))]


@renamed_arguments(by_variant="by_representation")
def best_representation(by_representation: pd.DataFrame, baseline: str = "first_mlp", margin: float = 0.05) -> str:
    """The inference criterion: the source representation with the highest mean r for relation scores
    without context, where the head reads the source alone (ties: the first column), unless it beats ``baseline``
    (the paper's) by no more than ``margin``: a smaller gain is within the spread of r over relations, so the
    paper's representation stays. ``margin=0`` gives the plain maximum."""
    r = by_representation.loc[("relation", "without")]
    best = str(r.idxmax())
    if baseline in r.index and r[best] - r[baseline] <= margin:
        return baseline
    return best


summary = renamed_function(correlation_summary, "summary")
compare_variants = renamed_function(compare_representations, "compare_variants")
best_variant = renamed_function(best_representation, "best_variant")


@renamed_arguments(by_variant="by_representation")
def representation_table(by_representation: pd.DataFrame, paper_models: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per representation (a :func:`compare_representations` table): mean r of relation and suppression
    scores without and with context; the paper's models' means (``paper.dynamic_summary()``) below, where given."""
    t = by_representation.T[[(s, c) for s in ("relation", "suppression") for c in ("without", "with")]]
    t.columns = [f"{score} r {'w/o' if context == 'without' else 'w/'}" for score, context in t.columns]
    if paper_models is not None:
        paper = paper_models[["mean r w/o", "mean r w/"]].rename(
            columns={"mean r w/o": "relation r w/o", "mean r w/": "relation r w/"})
        paper.index = [f"paper: {m}" for m in paper.index]
        t = pd.concat([t, paper])
    t.index.name = "representation"
    return t


@renamed_arguments(by_variant="by_representation")
def depth_curve(by_representation: pd.DataFrame) -> pd.DataFrame:
    """Mean r of relation scores (without / with context) of ``context_free_N`` per N, and of the full
    ``context_free`` (N = the layer itself) as the last row: how many blocks a token needs before it settles. Empty
    (the same columns, no rows) when no context-free representation was compared."""
    rows = []
    for name in by_representation.columns:
        rep = parse(name)
        if rep.base == "context_free":
            rows.append({"N": rep.depth if rep.depth is not None else "all", "representation": name,
                         "r w/o": by_representation.loc[("relation", "without"), name],
                         "r w/": by_representation.loc[("relation", "with"), name]})
    rows.sort(key=lambda r: (r["N"] == "all", r["N"] if r["N"] != "all" else 0))
    return pd.DataFrame(rows, columns=["N", "representation", "r w/o", "r w/"]).set_index("N")


def summary_row(rel_table: pd.DataFrame, label: str) -> pd.DataFrame:
    """Our mean / min / max r over relations (a :func:`paper_style` table) as one row of the paper's summary."""
    without, with_ = rel_table["r w/o context"], rel_table["r w/ context"]
    return pd.DataFrame([{
        "relations": int(without.notna().sum()), "mean r w/o": without.mean(), "min r w/o": without.min(),
        "max r w/o": without.max(), "mean r w/": with_.mean(), "min r w/": with_.min(), "max r w/": with_.max(),
    }], index=[label]).round(3)


def _write(table: pd.DataFrame, loaded, name: str, parameters: dict, wall_seconds: float,
           run: RunOptions) -> Path | None:
    """``table`` as ``<results_dir>/<model>/dynamic/<name>.csv`` with its manifest; None when ``run`` keeps no files."""

    out = run.folder(loaded.name, "dynamic")
    if out is None:
        return None
    manifest = build_manifest(parameters=parameters, wall_seconds=wall_seconds, model=loaded.manifest())
    return write_table(table, out / f"{name}.csv", manifest)


def write_correlations(corr: pd.DataFrame, loaded, static, dynamic: DynamicScores, k: int | None,
                       wall_seconds: float, run: RunOptions, name: str = "correlations") -> Path | None:
    """The correlation table as ``<results_dir>/<model>/dynamic/<name>.csv`` with its manifest (the static scores'
    representation, recorded as ``static_variant``, k and the dynamic run's parameters); None when ``run`` keeps no
    files."""
    return _write(corr, loaded, name, {"static_variant": static.representation, "k": k,
                                       "dynamic": dynamic.manifest["parameters"]}, wall_seconds, run)


def write_representations(table: pd.DataFrame, loaded, dynamic: DynamicScores, representations, k: int | None,
                          wall_seconds: float, run: RunOptions) -> Path | None:
    """The :func:`representation_table` as ``<results_dir>/<model>/dynamic/representations.csv`` with its manifest
    (the representations, k, the context-free prefix and the dynamic run's parameters)."""

    return _write(table.reset_index(), loaded, "representations",
                  {"representations": list(representations), "k": k,
                   "context_free_prefix": list(default_prefix(loaded.weights)),
                   "dynamic": dynamic.manifest["parameters"]}, wall_seconds, run)


def multi_token_run(loaded, static, mode: str, *, relations=None, k: int | None = None,
                    run: RunOptions = RunOptions(), **kwargs):
    """Multi-token dynamic scores in one tokenisation ``mode``, their correlation with the single-token static
    scores (written as ``multi_token_<mode>_correlations.csv`` when there is any), and a sentence on the run;
    ``kwargs`` (max_pairs, rank_cap, ...) go to :func:`~maps_utils.dynamic.scores.multi_token_scores`."""

    mt = multi_token_scores(loaded, relations, mode=mode, k=k, run=run, **kwargs)
    corr = correlations(static, mt, k=k)
    no_static = [r.name for r in mt.relations if r.name not in {s.name for s in static.relations}]
    note = (f"mode {mode}: {len(mt.relations)} relations, pairs {({r.name: r.n for r in mt.relations})}; "
            f"{mt.manifest['wall_seconds']:.0f} s; skipped (< 30 pairs): {mt.skipped or 'none'}; "
            f"no single-token static score: {no_static or 'none'}")
    if len(corr):
        write_correlations(corr, loaded, static, mt, k, mt.manifest["wall_seconds"], run,
                           name=f"multi_token_{mode}_correlations")
    return mt, corr, note
