"""Figure helpers: every figure is saved as PNG and SVG under ``figures/<model-slug>/``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def model_slug(name: str) -> str:
    """A file-system-safe name for a model id (``EleutherAI/pythia-6.9b`` -> ``EleutherAI__pythia-6.9b``)."""
    return str(name).replace("/", "__").replace("\\", "__")


def save_figure(fig: plt.Figure, figures_dir: str | Path, model: str, name: str) -> list[Path]:
    """Save ``fig`` as ``<figures_dir>/<model-slug>/<name>.png`` and ``.svg``; returns the paths."""
    out = Path(figures_dir) / model_slug(model)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150 if path.suffix == ".png" else None)
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
