"""Statistics of the human study: answer rates, inter-annotator agreement (Cohen's and Fleiss' kappa with bootstrap
intervals) and the describer's answers against people's. Everything here reads only the files people wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..core.params import check_parameters
from ..describe.detection_stats import THRESHOLD, auc
from .annotations import is_complete
from .questions import CORRECTNESS, OPERATION_KINDS, PATTERN, QUESTIONS

# ---- statistics --------------------------------------------------------------------------------------
POOLED = "(pooled)"  # cannot be an annotator name


def answered(ann: pd.DataFrame, question: str) -> pd.DataFrame:
    """The rows that answer ``question``, as each statistic counts them:

    * ``pattern_observable``: every row where it is answered;
    * ``description_correct``: answered, on items where the describer gave a pattern — the paper judged the
      descriptions of heads GPT-4o described (MAPS-SPEC §4.3); for "Unclear" items the verdict only restates the
      pattern question;
    * ``operation_kind``: rows with a pattern observable and a kind given.
    """
    if question == "pattern_observable":
        return ann[ann.pattern_observable != ""]
    if question == "description_correct":
        return ann[(ann.description_correct != "") & (ann.describer_answer == "pattern")]
    if question == "operation_kind":
        return ann[(ann.pattern_observable == "yes") & (ann.operation_kind != "")]
    raise ValueError(f"Unknown question {question!r}; use {', '.join(QUESTIONS)}.")


def rates(ann: pd.DataFrame) -> pd.DataFrame:
    """Per annotator and pooled: answers to the pattern question and the share "yes"; answers on described items
    and the correctness shares; answers with a kind and the kind shares (each over :func:`answered` rows)."""
    def share(rows, field, value):
        return (rows[field] == value).mean() if len(rows) else np.nan

    def one(g: pd.DataFrame) -> dict:
        p, c, k = answered(g, "pattern_observable"), answered(g, "description_correct"), answered(g, "operation_kind")
        out = {"pattern_answers": len(p), "pattern_yes": share(p, "pattern_observable", "yes"), "described_answers": len(c)}
        out |= {v: share(c, "description_correct", v) for v in CORRECTNESS}
        out["kind_answers"] = len(k)
        out |= {f"kind:{v}": share(k, "operation_kind", v) for v in OPERATION_KINDS}
        return out

    rows = {name: one(g) for name, g in ann.groupby("annotator", sort=True)}
    rows[POOLED] = one(ann)
    return _counts_as_int(pd.DataFrame(rows).T)


def _counts_as_int(table: pd.DataFrame) -> pd.DataFrame:
    counts = ["pattern_answers", "described_answers", "kind_answers", "items", "no_answer", "both_pattern",
              "describer_only", "people_only", "both_none"]
    return table.astype({c: int for c in counts if c in table.columns} | {
        c: float for c in table.columns if c not in counts})


def cohen_kappa(a: Sequence, b: Sequence, categories: Sequence | None = None) -> float:
    """Cohen's κ of two raters' labels for the same items; NaN when chance agreement is 1 (one category only)."""
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("cohen_kappa needs two equally long, non-empty label lists.")
    cats = list(categories) if categories is not None else sorted(set(a) | set(b))
    po = float(np.mean(a == b))
    pe = sum(float(np.mean(a == c)) * float(np.mean(b == c)) for c in cats)
    return float("nan") if np.isclose(pe, 1.0) else (po - pe) / (1 - pe)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' κ from an items × categories count matrix (every item rated by the same number of raters)."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=1)
    if counts.ndim != 2 or len(counts) == 0 or not np.allclose(n, n[0]) or n[0] < 2:
        raise ValueError("fleiss_kappa needs a non-empty items x categories matrix with the same number (>= 2) of "
                         "ratings per item.")
    n = n[0]
    p_i = (np.sum(counts**2, axis=1) - n) / (n * (n - 1))
    p_j = counts.sum(axis=0) / counts.sum()
    p_bar, pe = p_i.mean(), np.sum(p_j**2)
    return float("nan") if np.isclose(pe, 1.0) else float((p_bar - pe) / (1 - pe))


def kappa(wide: pd.DataFrame, categories: Sequence[str]) -> float:
    """κ of an items × annotators table of labels: Cohen's for two annotators, Fleiss' for more."""
    if wide.shape[1] == 2:
        return cohen_kappa(wide.iloc[:, 0], wide.iloc[:, 1], categories)
    counts = np.stack([(wide == c).sum(axis=1).to_numpy() for c in categories], axis=1)
    return fleiss_kappa(counts)


def kappa_by_question(ann: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Inter-annotator agreement per question, over the items answered (:func:`answered`) by every annotator who
    answered that question: method (Cohen's κ for two annotators, Fleiss' for more), annotators, items, raw
    agreement, κ, and a percentile bootstrap interval over items (seeded). Resamples whose κ is undefined (all
    labels one category) are left out; ``boot_valid`` counts the rest. Fewer than two annotators or items: NaN."""
    check_parameters(n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for field, cats in QUESTIONS.items():
        sub = answered(ann, field)
        wide = sub.pivot(index="item", columns="annotator", values=field).dropna() if len(sub) else pd.DataFrame()
        m, n_items = wide.shape[1], len(wide)
        row = {"question": field, "method": {0: "-", 1: "-", 2: "Cohen"}.get(m, "Fleiss"), "annotators": m,
               "items": n_items, "raw_agreement": np.nan, "kappa": np.nan, "ci_low": np.nan, "ci_high": np.nan,
               "boot_valid": 0}
        if m >= 2 and n_items >= 2:
            row["raw_agreement"] = float((wide.nunique(axis=1) == 1).mean())
            row["kappa"] = kappa(wide, cats)
            boots = np.array([kappa(wide.iloc[rng.integers(0, n_items, n_items)], cats) for _ in range(n_boot)])
            boots = boots[np.isfinite(boots)]
            row["boot_valid"] = len(boots)
            if len(boots):
                row["ci_low"], row["ci_high"] = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        rows.append(row)
    return pd.DataFrame(rows)


def describer_vs_people(ann: pd.DataFrame) -> pd.DataFrame:
    """Did the describer's pattern / "Unclear" match people's "pattern observable" yes / no? Over items where the
    describer gave a usable answer (``no_answer`` counts the answers left out because it gave none); one row per
    annotator and pooled: items, agreement, Cohen's κ and the four cells."""
    def one(g):
        usable = g[(g.describer_answer != "none") & (g.pattern_observable != "")]
        d = np.where(usable.describer_answer == "pattern", "yes", "no")
        p = usable.pattern_observable.to_numpy()
        return {"items": len(usable), "no_answer": int((g.describer_answer == "none").sum()),
                "agreement": float(np.mean(d == p)) if len(usable) else np.nan,
                "kappa": cohen_kappa(d, p, PATTERN) if len(usable) else np.nan,
                "both_pattern": int(((d == "yes") & (p == "yes")).sum()),
                "describer_only": int(((d == "yes") & (p == "no")).sum()),
                "people_only": int(((d == "no") & (p == "yes")).sum()),
                "both_none": int(((d == "no") & (p == "no")).sum())}

    rows = {name: one(g) for name, g in ann.groupby("annotator", sort=True)}
    rows[POOLED] = one(ann)
    return _counts_as_int(pd.DataFrame(rows).T)


# ---- what notebook 05 says ------------------------------------------------------------------------------
def unavailable(what: str, annotating: bool) -> str:
    """Why a part of the analysis is not shown: annotations are hidden while annotating, or there are none."""
    return f"{what} needs annotations" + (" (hidden while annotating)." if annotating else "; none yet.")


def counts_sentence(ann: pd.DataFrame, n_items: int) -> str:
    return (f"{ann.annotator.nunique()} annotator(s), {len(ann)} answered rows on {ann['item'].nunique()} of "
            f"{n_items} items ({int(ann.apply(is_complete, axis=1).sum())} complete)")


def agreement_sentences(agree: pd.DataFrame, n_boot: int) -> list[str]:
    """One sentence per question of an :func:`kappa_by_question` table."""
    lines = []
    for r in agree.itertuples():
        if r.annotators < 2 or r.items < 2:
            lines.append(f"{r.question}: too few shared answers for agreement ({r.annotators} annotator(s), "
                         f"{r.items} items)")
            continue
        lines.append(f"{r.question}: {r.method} kappa {r.kappa:.2f} (95% CI {r.ci_low:.2f} to {r.ci_high:.2f}, "
                     f"{r.boot_valid} of {n_boot} resamples defined) over {r.items} items answered by all "
                     f"{r.annotators}; raw agreement {r.raw_agreement:.0%}")
    return lines


def describer_sentences(ann: pd.DataFrame, vs: pd.DataFrame) -> list[str]:
    """The describer against people (a :func:`describer_vs_people` table), and the share of described patterns
    people judged correct (the paper: about 80% for GPT-4o)."""
    pooled = vs.loc[POOLED]
    lines = [f"The describer's pattern / Unclear matched people's yes / no on {pooled.agreement:.0%} of "
             f"{int(pooled['items'])} answers (Cohen's kappa {pooled.kappa:.2f}); the describer saw a pattern people "
             f"did not in {int(pooled.describer_only)}, and missed one people saw in {int(pooled.people_only)}; "
             f"{int(pooled.no_answer)} answers were on items where it gave no usable answer (left out)."]
    judged = answered(ann, "description_correct")
    if len(judged):
        lines.append(f"Described patterns judged correct: {(judged.description_correct == 'correct').mean():.0%} of "
                     f"{len(judged)} answers (partially: {(judged.description_correct == 'partially').mean():.0%}); "
                     "the paper reports about 80% correct for GPT-4o.")
    else:
        lines.append("No answers on items where the describer gave a pattern, so no correctness rate.")
    return lines


def detection_vs_people(scores: pd.DataFrame, annotations: pd.DataFrame, *,
                         threshold: float = THRESHOLD) -> pd.DataFrame:
    """How well the automatic score of the LLM descriptions predicts people's "correct" (notebook 05's long
    annotation table): AUC, and Cohen's kappa between "verified" and "correct", over answered items."""
    judged = answered(annotations, "description_correct")
    llm = scores[scores.describer == "llm"][["layer", "head", "score"]]
    m = judged.merge(llm, on=["layer", "head"], how="inner").dropna(subset=["score"])
    correct = (m.description_correct == "correct").to_numpy()
    verified = (m.score >= threshold).to_numpy()
    po = float((correct == verified).mean()) if len(m) else float("nan")
    pe = float(correct.mean() * verified.mean() + (1 - correct.mean()) * (1 - verified.mean())) if len(m) else float("nan")
    kappa = (po - pe) / (1 - pe) if len(m) and pe < 1 else float("nan")
    return pd.DataFrame([{"answers": len(m), "correct": int(correct.sum()), "auc": auc(m.score, correct),
                          "kappa_at_threshold": kappa, "agreement": po}])


