"""Summaries of the automatic check: the gap to the shuffled control with a bootstrap interval, the share of heads
verified per layer quartile, and agreement with people's judgements."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..core.deprecation import renamed_function
from .sampling import layer_quartile, quartile_labels

THRESHOLD = 0.75


# ---- summaries ----------------------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile bootstrap CI of the mean of ``values`` (NaNs dropped); (nan, nan) with fewer than 2 values."""
    v = np.asarray([x for x in values if not np.isnan(x)], float)
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return tuple(float(x) for x in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def detection_summary(scores: pd.DataFrame, *, threshold: float = THRESHOLD, n_boot: int = 2000,
                      seed: int = 0) -> pd.DataFrame:
    """Per describer of a detection-score table (:func:`~maps_utils.describe.detection.score_descriptions`): heads, heads judged, mean score, mean shuffled control, their gap with a bootstrap CI
    (over heads with both), and the share verified (score >= threshold, over every head)."""
    out = []
    for name, g in scores.groupby("describer", sort=False):
        both = g.dropna(subset=["score", "control_score"])
        gap = (both.score - both.control_score).to_numpy()
        lo, hi = bootstrap_ci(gap, n_boot=n_boot, seed=seed)
        out.append({"describer": name, "heads": len(g), "with_pattern": int(g.has_pattern.sum()),
                    "judge_failed": int((g.judged == "failed").sum()), "mean_score": g.score.mean(),
                    "mean_control": g.control_score.mean(), "gap": float(gap.mean()) if len(gap) else float("nan"),
                    "gap_ci_low": lo, "gap_ci_high": hi, "gap_heads": len(gap),
                    "share_verified": float((g.score >= threshold).mean())})
    return pd.DataFrame(out)


summary = renamed_function(detection_summary, "summary")


def verified_by_quartile(scores: pd.DataFrame, n_layers: int, *, threshold: float = THRESHOLD) -> pd.DataFrame:
    """Per layer quartile: heads and the share verified for each describer (columns ``verified_<describer>``)."""
    s = scores.assign(quartile=[layer_quartile(la, n_layers) for la in scores.layer], ok=scores.score >= threshold)
    table = s.pivot_table(index="quartile", columns="describer", values="ok", aggfunc="mean").reindex(range(4))
    out = pd.DataFrame({"quartile": range(4), "layers": quartile_labels(n_layers),
                        "n_heads": s[s.describer == s.describer.iloc[0]].groupby("quartile").size()
                        .reindex(range(4), fill_value=0).to_numpy() if len(s) else 0})
    for col in table.columns:
        out[f"verified_{col}"] = table[col].to_numpy()
    return out


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (ties count half); NaN without both classes."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    if not y.any() or y.all():
        return float("nan")
    pos, neg = s[y], s[~y]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))
