"""The figure helpers of :mod:`maps_utils.report.plots`, each fed the smallest real table its notebook passes (from a
tiny random Llama's static and dynamic scores, or built with the package's own table functions): each returns a
figure whose axes are labelled as the function promises, and :func:`save_figure` writes PNG and SVG atomically."""

from __future__ import annotations

import errno

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from maps_utils import HeadWeights, LoadedModel
from maps_utils import relations as R
from maps_utils.ablation.result import AblationResult
from maps_utils.core import io as IO
from maps_utils.core.store import RunOptions
from maps_utils.describe import pipeline as DS
from maps_utils.describe import sampling as SA
from maps_utils.dynamic import correlation as C
from maps_utils.dynamic import fidelity as FI
from maps_utils.dynamic import scores as DY
from maps_utils.qk.study import MEASURES, QKStudy
from maps_utils.report import paper as P
from maps_utils.report import plots as PL
from maps_utils.static import scores as SC
from maps_utils.static import tables as TB

from ..conftest import make_tiny, word_tokenizer

matplotlib.use("Agg")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
L, H = 2, 4  # the tiny Llama: 2 layers x 4 heads
RELATIONS = ["copying", "country_capital", "antonym"]  # named as in the paper's table, pairs of word tokens


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def scored():
    """Static scores, dynamic scores and their correlations of three relations on a tiny random Llama."""
    model = make_tiny("llama-gqa")
    loaded = LoadedModel("tiny-llama", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"),
                         torch.float64, "test", 0.0)
    rels = [R.Relation(name, tuple((f"t{j}", f"t{(j + shift) % 100}") for j in range(40)), category=cat,
                       copying=shift == 0)
            for name, shift, cat in zip(RELATIONS, (0, 1, 7), ("algorithmic", "knowledge", "linguistic"), strict=True)]
    run = RunOptions(results_dir=None, progress=False)
    static = SC.static_scores(loaded, rels, run=run)
    dyn = DY.dynamic_scores(loaded, rels, ["t90 <X>", "t91 t92 <X>"], run=run)
    return static, dyn, C.correlations(static, dyn)


def labelled(ax) -> bool:
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel())


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


# ---- save_figure --------------------------------------------------------------------------------------
def small_figure(title: str = "a figure") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    ax.set(xlabel="x", ylabel="y", title=title)
    return fig


def no_partials(folder) -> bool:
    return not [p.name for p in folder.iterdir() if ".partial-" in p.name]


def test_save_figure_writes_a_png_and_an_svg_under_the_model_slug(tmp_path):
    paths = PL.save_figure(small_figure(), tmp_path, "org/model", "01_fig")
    folder = tmp_path / "org__model"
    assert paths == [folder / "01_fig.png", folder / "01_fig.svg"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    assert b"<svg" in paths[1].read_bytes()[:2000]
    assert sorted(p.name for p in folder.iterdir()) == ["01_fig.png", "01_fig.svg"]


def test_a_failed_write_leaves_the_earlier_figure_and_no_partial(tmp_path, monkeypatch):
    png, svg = PL.save_figure(small_figure(), tmp_path, "m", "fig")
    before = png.read_bytes(), svg.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IO.os, "fsync", full_disk)  # fails after the partial file is written
    with pytest.raises(IO.StorageError, match="is full"):
        PL.save_figure(small_figure("another figure"), tmp_path, "m", "fig")
    assert (png.read_bytes(), svg.read_bytes()) == before
    assert no_partials(png.parent)


def test_a_figure_that_cannot_be_drawn_leaves_the_earlier_figure_untouched(tmp_path):
    png, svg = PL.save_figure(small_figure(), tmp_path, "m", "fig")
    before = png.read_bytes(), svg.read_bytes()
    with pytest.raises(ValueError):
        PL.save_figure(small_figure(r"$\frac{$"), tmp_path, "m", "fig")  # bad mathtext fails while rendering
    assert (png.read_bytes(), svg.read_bytes()) == before
    assert no_partials(png.parent)


def test_a_file_where_the_folder_should_be_is_one_sentence_and_stays_as_it_was(tmp_path):
    png, _ = PL.save_figure(small_figure(), tmp_path, "m", "fig")
    before = png.read_bytes()
    with pytest.raises(IO.StorageError) as err:
        PL.save_figure(small_figure(), png, "m", "fig")  # figures_dir is the earlier PNG
    text = str(err.value)
    assert f"{png} is a file where a folder is needed" in text and "\n" not in text and text.endswith(".")
    assert png.read_bytes() == before and png.is_file()
    assert no_partials(png.parent)


# ---- notebook 00 ---------------------------------------------------------------------------------------
def test_layer_head_heatmap_draws_layers_on_x_heads_on_y_and_a_labelled_colour_bar():
    values = np.arange(L * H, dtype=float).reshape(L, H)
    ax = PL.layer_head_heatmap(values, "norms", "Frobenius norm", cmap="viridis")
    assert isinstance(ax.figure, plt.Figure)  # returns the axes; notebook 00 saves ax.figure
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("layer", "head", "norms")
    image = ax.images[0]
    np.testing.assert_array_equal(image.get_array(), values.T)  # [head, layer]
    assert image.colorbar.ax.get_ylabel() == "Frobenius norm"


# ---- notebook 01 ---------------------------------------------------------------------------------------
def test_relation_grid_has_one_titled_panel_per_relation_and_labels_its_outer_axes(scored):
    static, _, _ = scored
    table = static.table()
    fig = PL.relation_grid(table, "suppression_score", "tiny", ncols=2)  # 3 relations on a 2 x 2 grid
    assert isinstance(fig, plt.Figure)
    panels = np.array(fig.axes[:4]).reshape(2, 2)
    used = [ax for ax in panels.flat if ax.axison]
    assert len(used) == 3 and not panels[1, 1].axison  # the spare panel is hidden
    for ax, rel in zip(used, RELATIONS, strict=True):
        grid = table[table.relation == rel].suppression_score.to_numpy().reshape(L, H)
        assert ax.get_title() == f"{rel} (max {grid.max():.2f})"
        np.testing.assert_array_equal(ax.images[0].get_array(), grid.T)
    assert [ax.get_ylabel() for ax in panels[:, 0]] == ["head", "head"]
    # the lowest panel in use of each column carries the x label, the one above the hidden panel too
    assert (panels[1, 0].get_xlabel(), panels[0, 1].get_xlabel(), panels[1, 1].get_xlabel()) == ("layer", "layer", "")
    assert any(t.get_visible() and t.get_text() for t in panels[0, 1].get_xticklabels())
    assert used[-1].images[0].colorbar.ax.get_ylabel() == "suppression score"


def test_category_map_figure_is_labelled_and_counts_the_heads_per_category(scored):
    static, _, _ = scored
    cats = TB.category_map(static.table(), tau=0.1)
    fig = PL.category_map_figure(cats, "categories")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("layer", "head")
    counts = cats.label.value_counts()
    legend = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert legend == sorted(f"{lab} ({n})" for lab, n in counts.items())
    assert counts.sum() == L * H


# ---- notebook 02 ---------------------------------------------------------------------------------------
def test_static_dynamic_scatter_titles_each_panel_with_its_r_and_labels_the_outer_axes(scored):
    static, dyn, corr = scored
    fig = PL.static_dynamic_scatter(static, dyn, "relation", corr, ncols=2)
    assert isinstance(fig, plt.Figure)
    panels = np.array(fig.axes[:4]).reshape(2, 2)
    for ax, rel in zip(panels.flat, RELATIONS, strict=False):
        r = corr[(corr.relation == rel) & (corr.score_type == "relation")].set_index("context").r
        assert ax.get_title() == f"{rel}\nr = {r['without']:.2f} / {r['with']:.2f}"
        assert len(ax.collections) == 2  # without / with context
        assert len(ax.collections[0].get_offsets()) == len(dyn.relation(rel).templates) * L * H
    assert [ax.get_ylabel() for ax in panels[:, 0]] == ["dynamic score"] * 2
    assert (panels[1, 0].get_xlabel(), panels[0, 1].get_xlabel()) == ("static score", "static score")
    assert not panels[1, 1].axison


def test_correlation_dot_plot_puts_relations_on_y_and_r_on_a_labelled_x(scored):
    _, _, corr = scored
    ours = C.paper_style(corr, "relation")
    fig = PL.correlation_dot_plot(ours, P.dynamic_correlations(), title="vs paper")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("Pearson r")
    assert tick_labels(ax.yaxis) == RELATIONS and ax.get_ylabel() == "relation"
    ours_without = ax.collections[3].get_offsets()[:, 0]  # after the three paper models
    np.testing.assert_allclose(ours_without, ours["r w/o context"].to_numpy())


def fidelity_table() -> pd.DataFrame:
    reps = ["first_mlp", "first_mlp+norm", "context_free_1", "context_free"]
    return pd.DataFrame([{"relation": "copying", "template": "t90 <X>", "representation": rep, "layer": layer,
                          "cosine": 0.2 * i + 0.1 * layer, "n_prompts": 40}
                         for i, rep in enumerate(reps) for layer in range(L)])


def test_fidelity_figure_labels_both_panels_and_draws_one_line_per_representation():
    profile = FI.profile(fidelity_table())
    by_variant = pd.DataFrame({"first_mlp": [0.5, 0.3], "context_free_1": [0.2, 0.1], "context_free": [0.6, 0.4]},
                              index=pd.MultiIndex.from_tuples([("relation", "without"), ("relation", "with")],
                                                              names=["score", "context"]))
    fig = PL.fidelity_figure(profile, C.depth_curve(by_variant), title="representations")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2
    assert all(labelled(ax) for ax in fig.axes)
    left, right = fig.axes
    assert [line.get_label() for line in left.lines] == list(profile.columns)
    assert tick_labels(right.xaxis)[:2] == ["1", "all"]
    assert len(PL.fidelity_figure(profile).axes) == 1 and labelled(PL.fidelity_figure(profile).axes[0])
    # no context-free representation compared: an empty depth curve, and the figure has the profile alone
    none = C.depth_curve(by_variant[["first_mlp"]])
    assert none.empty and list(none.columns) == ["representation", "r w/o", "r w/"] and none.index.name == "N"
    assert len(PL.fidelity_figure(profile, none).axes) == 1


# ---- notebook 03 ---------------------------------------------------------------------------------------
def ablation_result() -> AblationResult:
    """Two relations: their own curve, two random-head samples, and one control task each."""
    curves = {("copying", "relation", "copying", ""): [0.9, 0.4, 0.0],
              ("copying", "random", "copying", 0): [0.9, 0.85, 0.8], ("copying", "random", "copying", 1): [0.9, 0.9, 0.7],
              ("copying", "control", "antonym", ""): [0.6, 0.6, 0.5],
              ("antonym", "relation", "antonym", ""): [0.6, 0.3, 0.2],
              ("antonym", "random", "antonym", 0): [0.6, 0.6, 0.6], ("antonym", "random", "antonym", 1): [0.6, 0.5, 0.6],
              ("antonym", "control", "copying", ""): [0.9, 0.9, 0.8]}
    rows = [{"relation": rel, "task": task, "curve": kind, "sample": sample, "step": s, "removed": "", "accuracy": a,
             "n_prompts": 10} for (rel, kind, task, sample), accs in curves.items() for s, a in enumerate(accs)]
    tasks = pd.DataFrame([{"relation": r, "category": None, "in_paper": True, "template": "", "n_pairs": 10,
                           "demo_overlap": 0, "base": b, "status": "run"} for r, b in (("copying", 0.9), ("antonym", 0.6))])
    return AblationResult("tiny-llama", "zero", tasks, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(rows))


def test_ablation_curves_label_every_panel_x_and_the_first_column_y():
    fig = PL.ablation_curves(ablation_result())
    assert isinstance(fig, plt.Figure)
    used = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in used] == ["copying", "antonym"] and len(fig.axes) == 4  # ncols=4
    assert all(ax.get_xlabel() == "heads removed" for ax in used)
    assert used[0].get_ylabel() == "accuracy"  # shared y: the other panels read it from the first
    np.testing.assert_allclose(used[0].lines[-1].get_ydata(), [0.9, 0.4, 0.0])  # the relation's own curve
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "random heads (mean ± std)", "relation heads on a control task", "relation heads"]


# ---- notebooks 04 and 05 -------------------------------------------------------------------------------
def test_stacked_quartiles_labels_its_axes_and_writes_each_quartiles_count():
    rows = pd.DataFrame({"quartile": [0, 0, 1, 3, 3, 3], "describer_outcome": ["pattern", "unclear", "pattern",
                                                                                 "failed", "pattern", "unparsed"]})
    chart = SA.quartile_table(rows, "describer_outcome", DS.OUTCOMES, n_layers=8)
    fig = PL.stacked_quartiles(chart, list(DS.OUTCOMES), "outcomes")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("layer quartile", "share")
    assert [t.get_text() for t in ax.texts] == ["n=2", "n=1", "n=0", "n=3"]
    assert tick_labels(ax.xaxis) == ["Q1\n[0,2)", "Q2\n[2,4)", "Q3\n[4,6)", "Q4\n[6,8)"]
    tops = [sum(p.get_height() for p in ax.patches[q::4]) for q in range(4)]
    np.testing.assert_allclose(tops, [1, 1, 0, 1])  # the shares of a quartile stack to one (none in Q3)


def test_description_shares_stacks_the_describers_outcomes_on_labelled_axes():
    table = pd.DataFrame({"quartile": [0, 1, 1, 2], "status": ["ok", "ok", "failed", "ok"],
                          "parse": ["json", "json", "failed", "unparsed"], "has_pattern": [True, False, False, False]})
    fig = PL.description_shares(DS.quartile_shares(table, n_layers=4))
    ax = fig.axes[0]
    assert labelled(ax) and ax.get_ylabel() == "share of described heads"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(DS.OUTCOMES)
    pattern = [p.get_height() for p in ax.patches[:4]]
    np.testing.assert_allclose(pattern, [1.0, 0.0, 0.0, 0.0])


# ---- notebook 06 ---------------------------------------------------------------------------------------
def qk_study() -> QKStudy:
    rng = np.random.default_rng(0)
    val = pd.DataFrame([{"relation": rel, "prompt_set": ps, "layer": la, "head": h, "relation_head": (la + h) % 3 == 0,
                         **{m: rng.uniform() for m in MEASURES}, "n": 40}
                        for rel in RELATIONS[:2] for ps in ("relation", "distractor") for la in range(L) for h in range(H)])
    corr = pd.DataFrame({"relation": RELATIONS[:2], "category": ["algorithmic", "knowledge"], "r_ov": [0.6, 0.2],
                         "r_joint": [0.7, 0.1], "r_oracle": [0.8, 0.5], "n_points": 16, "k": [1, 10]})
    return QKStudy(val, pd.DataFrame(), corr)


def test_qk_figure_labels_the_attention_scatter_and_names_the_relations_on_the_right():
    study = qk_study()
    fig = PL.qk_figure(study, "qk")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2
    left, right = fig.axes
    assert labelled(left)
    on_relation_prompts = (study.validation.prompt_set == "relation").sum()
    assert sum(len(c.get_offsets()) for c in left.collections) == on_relation_prompts
    assert right.get_xlabel().startswith("Pearson r") and right.get_ylabel() == "relation"
    assert tick_labels(right.yaxis) == ["country_capital", "copying"]  # sorted by r_ov
