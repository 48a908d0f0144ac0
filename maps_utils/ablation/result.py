"""The causal experiment's result: its tables, the paper's summary and the paper's table layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.store import result_folder, write_table

CURVE_TYPES = ("relation", "random", "control")


@dataclass
class AblationResult:
    """Everything the causal experiment produced for one model and ablation kind (tidy tables)."""

    model: str
    kind: str
    tasks: pd.DataFrame  # relation, category, in_paper, template, n_pairs, demo_overlap, base, status
    head_table: pd.DataFrame  # relation, rank, layer, head, score
    controls: pd.DataFrame  # relation, control, overlap, base, control_base
    curves: pd.DataFrame  # relation, task, curve, sample, step, accuracy, n_prompts
    manifest: dict = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    def curve(self, relation: str, curve: str = "relation", task: str | None = None) -> pd.DataFrame:
        sel = self.curves[(self.curves.relation == relation) & (self.curves.curve == curve)]
        return sel if task is None else sel[sel.task == task]

    def summary(self) -> pd.DataFrame:
        """The paper's table, numeric: per relation #heads removed (first step reaching accuracy 0, else all its
        heads), base and post-removal accuracy (−TR), random heads at the same count (mean ± std over samples),
        control tasks (mean ± std of base and post-removal accuracy), and % changes."""
        rows = []
        for rel in self.tasks[self.tasks.status == "run"].relation:
            acc = self.curve(rel).sort_values("step").accuracy.to_numpy()
            m = len(acc) - 1
            zero = np.flatnonzero(acc[1:] == 0)
            s = int(zero[0]) + 1 if zero.size else m
            base, tr = acc[0], acc[s]

            rnd = np.array([_at(g, s)[1] for _, g in self.curve(rel, "random").groupby("sample")])
            ctr = np.array([_at(g, s) for _, g in self.curve(rel, "control").groupby("task")]).reshape(-1, 2)
            task = self.tasks.set_index("relation").loc[rel]
            rows.append({
                "relation": rel, "category": task.category, "in_paper": bool(task.in_paper), "n_pairs": int(task.n_pairs),
                "relation_heads": m, "heads_removed": s, "base": base, "tr": tr,
                "rnd_mean": rnd.mean() if rnd.size else np.nan, "rnd_std": rnd.std() if rnd.size else np.nan,
                "n_ctrl": len(ctr),
                "base_ctr_mean": ctr[:, 0].mean() if len(ctr) else np.nan,
                "base_ctr_std": ctr[:, 0].std() if len(ctr) else np.nan,
                "tr_ctr_mean": ctr[:, 1].mean() if len(ctr) else np.nan,
                "tr_ctr_std": ctr[:, 1].std() if len(ctr) else np.nan,
            })
        out = pd.DataFrame(rows, columns=[
            "relation", "category", "in_paper", "n_pairs", "relation_heads", "heads_removed", "base", "tr", "rnd_mean",
            "rnd_std", "n_ctrl", "base_ctr_mean", "base_ctr_std", "tr_ctr_mean", "tr_ctr_std"])
        def pct(after, base):  # undefined (NaN) from a base of 0
            return 100 * (after - base) / base.where(base != 0)

        out["tr_change_pct"] = pct(out.tr, out.base)
        out["rnd_change_pct"] = pct(out.rnd_mean, out.base)
        out["ctr_change_pct"] = pct(out.tr_ctr_mean, out.base_ctr_mean)
        return out

    def heads_by_relation(self) -> pd.DataFrame:
        """Per relation: how many relation heads, the best static score, and the first ten heads (``layer.head``)."""
        named = self.head_table.assign(h=self.head_table.layer.astype(str) + "." + self.head_table["head"].astype(str))
        return named.groupby("relation", sort=False).agg(n_heads=("h", "size"), best=("score", "max"),
                                                          first_ten=("h", lambda s: ", ".join(s[:10])))

    def paper_table(self) -> pd.DataFrame:
        """:meth:`summary` laid out as the paper's table (``↓48% → 0.46``, ``0.88 ± 0.03``)."""
        return paper_layout(self.summary())

    def write(self, results_dir: str | Path) -> Path:
        """Write every table (CSV + manifest) under ``<results_dir>/<model>/ablation/<kind>/``."""
        out = result_folder(results_dir, self.model, "ablation", self.kind)
        for name, table in (("tasks", self.tasks), ("heads", self.head_table), ("controls", self.controls),
                            ("curves", self.curves), ("summary", self.summary())):
            write_table(table, out / f"{name}.csv", self.manifest)
        return out


def _at(curve: pd.DataFrame, step: int) -> tuple[float, float]:
    """A curve's base accuracy and its accuracy after ``step`` heads (its last evaluated step up to ``step``: a
    shorter random sample counts with all its heads; baselines are always evaluated at the table's step)."""
    curve = curve.sort_values("step")
    return curve.accuracy.iloc[0], curve[curve.step <= step].accuracy.iloc[-1]


def _change(base: float, after: float, std: float | None = None) -> str:
    if not np.isfinite(after):
        return "—"
    tail = f" ± {std:.2f}" if std is not None else ""
    if not base:
        return f"→ {after:.2f}{tail}"  # no relative change from a base of 0
    pct = 100 * (after - base) / base
    return f"{'↓' if pct < 0 else '↑'}{abs(pct):.0f}% → {after:.2f}{tail}"


def paper_layout(summary: pd.DataFrame) -> pd.DataFrame:
    """A numeric summary (:meth:`AblationResult.summary`) as the paper's table of strings."""
    rows = []
    for r in summary.itertuples():
        ctrl = r.n_ctrl > 0
        rows.append({
            "Relation": r.relation, "#Heads removed": r.heads_removed, "Base": f"{r.base:.2f}",
            "−TR": _change(r.base, r.tr),
            "−RND": _change(r.base, r.rnd_mean, r.rnd_std) if np.isfinite(r.rnd_mean) else "—",
            "# tasks": r.n_ctrl,
            "Base (CTR)": f"{r.base_ctr_mean:.2f} ± {r.base_ctr_std:.2f}" if ctrl else "—",
            "−TR (CTR)": _change(r.base_ctr_mean, r.tr_ctr_mean, r.tr_ctr_std) if ctrl else "—",
        })
    return pd.DataFrame(rows)
