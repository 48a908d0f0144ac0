"""Figure helpers: every figure is saved as PNG and SVG under ``figures/<model-slug>/``."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..core.io import atomic_write_bytes
from ..core.store import model_slug


def save_figure(fig: plt.Figure, figures_dir: str | Path, model: str, name: str) -> list[Path]:
    """Save ``fig`` as ``<figures_dir>/<model-slug>/<name>.png`` and ``.svg``, each atomically (a full disk or a
    read-only folder is one sentence, and the figure already there stays); returns the paths."""
    out = Path(figures_dir) / model_slug(model)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for path in paths:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:], bbox_inches="tight", dpi=150 if path.suffix == ".png" else None)
        atomic_write_bytes(path, buffer.getbuffer())
    return paths


def layer_head_heatmap(values: np.ndarray, title: str, cbar_label: str, ax: plt.Axes | None = None,
                       **imshow_kw) -> plt.Axes:
    """Heatmap of a ``[n_layers, n_heads]`` array: layers on x, heads on y (the paper's orientation)."""
    values = np.asarray(values)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.28 * values.shape[0] + 1.5), max(2.5, 0.3 * values.shape[1] + 1)))
    im = ax.imshow(values.T, aspect="auto", origin="lower", interpolation="nearest", **imshow_kw)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, label=cbar_label)
    return ax


def _label_grid(axes, used: int, xlabel: str, ylabel: str) -> None:
    """Hide the unused panels of a grid and label its outer axes: the lowest panel in use of every column (above an
    unused one too) carries the x label and tick labels, the first column the y label."""
    nrows, ncols = axes.shape
    for ax in axes.flat[used:]:
        ax.axis("off")
    for col in range(min(ncols, used)):
        lowest = axes[(used - 1 - col) // ncols, col]
        lowest.set_xlabel(xlabel, fontsize=8)
        lowest.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)


def relation_grid(table, value: str = "score", title: str = "", ncols: int = 5, vmax: float = 1.0) -> plt.Figure:
    """One layer × head heatmap per relation of a tidy score table (``value``: score or suppression_score)."""
    rels = list(dict.fromkeys(table.relation))
    L, H = int(table.layer.max()) + 1, int(table["head"].max()) + 1
    nrows = -(-len(rels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, (0.9 + 0.16 * H) * nrows + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, rel in zip(axes.flat, rels, strict=False):
        g = table[table.relation == rel].sort_values(["layer", "head"])
        grid = g[value].to_numpy().reshape(L, H)
        im = ax.imshow(grid.T, aspect="auto", origin="lower", interpolation="nearest", vmin=0, vmax=vmax,
                       cmap="viridis")
        ax.set_title(f"{rel} (max {grid.max():.2f})", fontsize=8)
    _label_grid(axes, len(rels), "layer", "head")
    fig.colorbar(im, ax=axes, shrink=0.6, label=value.replace("_", " "))
    fig.suptitle(title)
    return fig


CATEGORY_COLORS = {
    "unclassified": "#f0f0f0", "algorithmic": "#1b9e77", "knowledge": "#d95f02", "linguistic": "#7570b3",
    "translation": "#e7298a", "2 categories": "#66a61e", "3 categories": "#e6ab02", "4 categories": "#a6761d",
}


def category_map_figure(cats, title: str = "") -> plt.Figure:
    """Heads coloured by the categories of the relations they implement (the paper's category figure)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    labels = list(CATEGORY_COLORS)
    L, H = int(cats.layer.max()) + 1, int(cats["head"].max()) + 1
    grid = np.zeros((L, H), dtype=int)
    for r in cats.itertuples():
        grid[r.layer, r.head] = labels.index(r.label)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * L + 2.5), max(2.5, 0.3 * H + 1)))
    ax.imshow(grid.T, aspect="auto", origin="lower", interpolation="nearest",
              cmap=ListedColormap(list(CATEGORY_COLORS.values())), vmin=0, vmax=len(labels) - 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(title)
    present = [lab for lab in labels if (cats.label == lab).any()]
    ax.legend(handles=[Patch(color=CATEGORY_COLORS[lab], label=f"{lab} ({(cats.label == lab).sum()})") for lab in present],
              bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8, frameon=False)
    return fig


CONTEXT_COLORS = {"without": "#1f77b4", "with": "#ff7f0e"}


def static_dynamic_scatter(static, dynamic, score_type: str = "relation", corr=None, ncols: int = 5,
                           title: str = "", k: int | None = None) -> plt.Figure:
    """Per relation: static score (x) against dynamic score (y) of every head × template, without and with
    context; panel titles give Pearson r (from ``corr``, a :func:`maps_utils.dynamic.scores.correlations` table)."""
    names = [r.name for r in dynamic.relations if r.name in {s.name for s in static.relations}]
    nrows = max(1, -(-len(names) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.7 * nrows + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    supp = score_type == "suppression"
    for ax, name in zip(axes.flat, names, strict=False):
        rel = dynamic.relation(name)
        kk = k or rel.k
        x = static.score_map(name, kk, suppression=supp).flatten().numpy()
        label = []
        for context in ("without", "with"):
            y = rel.scores(kk, context, suppression=supp).numpy()  # [T, L, H]
            ax.scatter(np.tile(x, y.shape[0]), y.reshape(-1), s=6, alpha=0.35, color=CONTEXT_COLORS[context],
                       label=f"{context} context", linewidths=0)
            if corr is not None:
                row = corr[(corr.relation == name) & (corr.score_type == score_type) & (corr.context == context)]
                if len(row):
                    label.append(f"{row.r.item():.2f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, zorder=0)
        ax.set_title(f"{name}\nr = {' / '.join(label)}" if label else name, fontsize=8)
    _label_grid(axes, len(names), "static score", "dynamic score")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, markerscale=3, frameon=False)
    fig.suptitle(title or f"static vs dynamic {score_type} scores (r without / with context)")
    fig.tight_layout()
    return fig


def correlation_dot_plot(ours, paper, title: str = "", models=("GPT-2 xl", "Pythia 6.9B", "Llama-3.1 8B")) -> plt.Figure:
    """Per relation, our r without and with context (filled) beside the paper's r without context per model (open)."""
    rels = list(ours.relation)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rels) + 1.4))
    yy = np.arange(len(rels))
    markers = ["s", "^", "D", "v", "P"]
    for i, model in enumerate(models):
        p = paper[paper.model == model].set_index("relation").reindex(rels)
        ax.scatter(p.r_without, yy, facecolors="none", edgecolors="0.45", marker=markers[i % len(markers)],
                   s=28, label=f"paper: {model} (w/o context)")
    ax.scatter(ours["r w/o context"], yy, color=CONTEXT_COLORS["without"], s=34, label="ours: without context", zorder=3)
    ax.scatter(ours["r w/ context"], yy, color=CONTEXT_COLORS["with"], s=34, label="ours: with context", zorder=3)
    ax.set_yticks(yy, rels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlim(-0.3, 1.02)
    ax.set_xlabel("Pearson r (static vs dynamic, heads × templates)")
    ax.set_ylabel("relation")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    ax.set_title(title)
    return fig


def ablation_curves(result, relations=None, ncols: int = 4) -> plt.Figure:
    """Accuracy against the number of heads removed, one panel per relation: its relation heads (red), the random
    heads (grey: mean ± std over samples), and its relation heads removed on each control task (thin blue); baselines
    evaluated at some steps only (``baseline_steps``) are drawn through those steps, with markers.
    ``result`` is a :class:`maps_utils.ablation.experiment.AblationResult`."""
    rels = list(relations) if relations is not None else list(result.tasks[result.tasks.status == "run"].relation)
    nrows = max(1, -(-len(rels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows + 0.5), squeeze=False, sharey=True)
    for ax, rel in zip(axes.flat, rels, strict=False):
        main = result.curve(rel).sort_values("step")
        rnd = result.curve(rel, "random").pivot_table(index="step", columns="sample", values="accuracy")
        if not rnd.empty:
            mean, std = rnd.mean(axis=1), rnd.std(axis=1, ddof=0)
            ax.fill_between(rnd.index, mean - std, mean + std, color="0.6", alpha=0.35, lw=0)
            sparse = len(rnd.index) < rnd.index.max() + 1  # baselines evaluated at some steps only: mark them
            ax.plot(rnd.index, mean, color="0.4", lw=1.2, marker="." if sparse else None, ms=4,
                    label="random heads (mean ± std)")
        for i, (_, g) in enumerate(result.curve(rel, "control").groupby("task")):
            g = g.sort_values("step")
            ax.plot(g.step, g.accuracy, color="tab:blue", lw=0.8, alpha=0.7,
                    marker="." if len(g) < g.step.max() + 1 else None, ms=3,
                    label="relation heads on a control task" if i == 0 else None)
        ax.plot(main.step, main.accuracy, color="tab:red", lw=1.8, label="relation heads")
        ax.set_title(rel, fontsize=9)
        ax.set_xlabel("heads removed", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
        ax.grid(alpha=0.3)
    _label_grid(axes, len(rels), "heads removed", "accuracy")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{result.model}: {result.kind}-ablation of relation heads at the last position", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def stacked_quartiles(table, categories, title: str = "", colors=None, ylabel: str = "share",
                      stacked: bool = True) -> plt.Figure:
    """Stacked bars per layer quartile: ``table`` has one row per quartile with ``layers``, ``n`` and a share column
    per category; the count is written over each bar (the layout of the paper's salient-operation charts).
    ``stacked=False`` draws the categories side by side (shares that need not add up to one)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    palette = colors or [plt.cm.tab10(i) for i in range(len(categories))]
    width = 0.65 if stacked else 0.65 / max(1, len(categories))
    for i, (name, color) in enumerate(zip(categories, palette, strict=False)):
        values = np.nan_to_num(table[name].to_numpy(dtype=float))
        if stacked:
            ax.bar(x, values, bottom=bottom, color=color, label=name, width=width)
            bottom += values
        else:
            ax.bar(x - 0.325 + width * (i + 0.5), values, color=color, label=name, width=width)
    for xi, n in zip(x, table["n"], strict=True):
        ax.text(xi, 1.02, f"n={n}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, [f"Q{q + 1}\n{lab}" for q, lab in enumerate(table["layers"])])
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("layer quartile")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return fig


def description_shares(shares, title: str = "") -> plt.Figure:
    """Stacked bars per layer quartile: the share of described heads with a pattern / Unclear / unparsed / failed
    (from :meth:`maps_utils.describe.pipeline.DescriptionResult.shares`), with the head count over each bar."""
    cats = ["pattern", "unclear", "unparsed", "failed"]  # describe.OUTCOMES (plots imports nothing from describe)
    table = shares.rename(columns={f"share_{c}": c for c in cats} | {"n_heads": "n"})
    return stacked_quartiles(table, cats, title, colors=["#1b7837", "#bdbdbd", "#fdae61", "#d73027"],
                             ylabel="share of described heads")


def fidelity_figure(profile, depth=None, title: str = "") -> plt.Figure:
    """Left: the fidelity profile (a ``fidelity.profile`` table: mean cosine per layer, one line per
    representation). Right, when ``depth`` (``correlation.depth_curve``) has rows: mean static-dynamic r of
    ``context_free_N`` against N."""
    depth = depth if depth is not None and len(depth) else None
    fig, axes = plt.subplots(1, 2 if depth is not None else 1, figsize=(12 if depth is not None else 7, 4),
                             squeeze=False)
    ax = axes[0, 0]
    for name in profile.columns:
        style = "-" if name.startswith("context_free") else "--" if name.endswith("+norm") else ":"
        ax.plot(profile.index, profile[name], style, marker=".", label=name)
    ax.set(xlabel="layer", ylabel="cosine with the real normalised source", ylim=(-0.05, 1.05),
           title="fidelity per layer")
    ax.legend(fontsize=7, ncol=2)
    if depth is not None:
        ax = axes[0, 1]
        xs = [str(n) for n in depth.index]
        ax.plot(xs, depth["r w/o"], marker="o", label="without context")
        ax.plot(xs, depth["r w/"], marker="s", label="with context")
        ax.set(xlabel="blocks run before the residual is held (N)", ylabel="mean r (relation scores)",
               title="context_free_N: static-dynamic r", ylim=(min(0.0, float(depth[["r w/o", "r w/"]].min().min())), 1.0))
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def qk_figure(study, title: str = "") -> plt.Figure:
    """Notebook 06: (left) attention on the source token from the last position, static QK map vs the real head,
    one point per head and relation (relation heads in orange); (right) per relation, Pearson r of the with-context
    dynamic scores with the OV-only static score, with the joint QK×OV score and with its attention oracle."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    v = study.validation[study.validation.prompt_set == "relation"]
    for mask, colour, label in ((~v.relation_head, "#1f77b4", "other heads"), (v.relation_head, "#ff7f0e",
                                                                             "relation heads (OV score ≥ τ)")):
        a.scatter(v.static_on_source[mask], v.real_on_source[mask], s=6 if colour == "#1f77b4" else 18, alpha=0.5,
                  c=colour, label=label)
    a.plot([0, 1], [0, 1], color="#999", lw=0.8)
    a.set_xlabel("static QK: share of attention on the source")
    a.set_ylabel("real attention on the source")
    a.legend(fontsize=8)
    c = study.correlations.sort_values("r_ov")
    y = np.arange(len(c))
    b.scatter(c.r_ov, y, label="OV only", c="#1f77b4")
    b.scatter(c.r_joint, y, label="joint QK×OV", c="#d62728", marker="D")
    b.scatter(c.r_oracle, y, label="control: OV rows mixed by the real attention", c="#2ca02c", marker="x")
    b.set_yticks(y, c.relation, fontsize=7)
    b.set_xlabel("Pearson r with the with-context dynamic score")
    b.set_ylabel("relation")
    b.axvline(0, color="#999", lw=0.8)
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)  # below the axes: hides no point
    fig.suptitle(title)
    fig.tight_layout()
    return fig
