"""The notebooks run end to end under papermill (their files are checked in tests/test_notebook_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_notebook(name: str, out: Path, **parameters) -> str:
    """Execute notebooks/<name> with papermill (cwd notebooks/, as `make all` does); returns the executed JSON."""
    import papermill

    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters=parameters,
                               cwd=str(ROOT / "notebooks"), progress_bar=False)
    return out.read_text()


def outputs_text(path: Path) -> str:
    """Everything an executed notebook shows (streams, text and markdown outputs), without its source."""
    parts = []
    for cell in json.loads(path.read_text())["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for mime in ("text/plain", "text/markdown", "text/html"):
                parts.append("".join(out.get("data", {}).get(mime, "")))
    return "\n".join(parts)


@pytest.mark.embedded
def test_model_overview_runs_under_papermill(smollm2, tmp_path):
    text = run_notebook("00_model_overview.ipynb", tmp_path / "00.ipynb", model="smollm2-135m", device="cpu",
                        dtype="float32", figures_dir=str(tmp_path))
    assert "-> ' Paris" in text
    assert (tmp_path / "smollm2-135m" / "00_ov_norms.png").is_file()
    assert (tmp_path / "smollm2-135m" / "00_ov_norms.svg").is_file()


@pytest.mark.embedded
def test_static_scores_notebook_runs_in_a_small_configuration(smollm2, tmp_path):
    text = run_notebook("01_static_scores.ipynb", tmp_path / "01.ipynb", model="smollm2-135m", device="cpu",
                        relations=["name_copying", "country_capital"], n_permutations=50,
                        figures_dir=str(tmp_path / "fig"), results_dir=str(tmp_path / "res"))
    assert "static copying criterion picks: raw; registry (inference criterion, notebook 02): first_mlp" in text
    for name in ("01_relation_scores", "01_suppression_scores", "01_category_map"):
        assert (tmp_path / "fig" / "smollm2-135m" / f"{name}.png").is_file()
        assert (tmp_path / "fig" / "smollm2-135m" / f"{name}.svg").is_file()
    assert (tmp_path / "res" / "smollm2-135m" / "static" / "first_mlp" / "scores.csv").is_file()
    assert "p_value" in text


@pytest.mark.embedded
def test_dynamic_correlation_notebook_runs_in_a_small_configuration(smollm2, tmp_path):
    text = run_notebook("02_dynamic_correlation.ipynb", tmp_path / "02.ipynb", model="smollm2-135m", device="cpu",
                        relations=["name_copying", "country_capital", "noun_pronoun"], max_pairs=40,
                        templates=["No <X> means no", "This is a document about <X>"], multi_token_modes=["paper"],
                        representations=["raw+norm", "context_free", "context_free_1"],
                        figures_dir=str(tmp_path / "fig"), results_dir=str(tmp_path / "res"))
    for name in ("02_scatter_relation", "02_scatter_suppression", "02_correlation_vs_paper",
                 "02_scatter_multi_token_paper", "02_source_representations"):
        assert (tmp_path / "fig" / "smollm2-135m" / f"{name}.png").is_file(), name
    out = tmp_path / "res" / "smollm2-135m" / "dynamic"
    for name in ("correlations", "multi_token_paper_correlations", "single/scores", "representations",
                 "fidelity/fidelity"):
        assert (out / f"{name}.csv").is_file(), name
        assert (out / f"{name}.manifest.json").is_file(), name
    reps = pd.read_csv(out / "representations.csv").set_index("representation")
    assert {"first_mlp", "raw+norm", "context_free", "context_free_1", "paper: GPT-2 xl"} <= set(reps.index)
    assert "Mean r without context" in text
    assert "highest mean r (relation scores, without context)" in text and "registered for smollm2-135m" in text


@pytest.mark.embedded
def test_ablation_notebook_runs_in_a_small_configuration(smollm2, tmp_path):
    text = run_notebook("03_ablation.ipynb", tmp_path / "03.ipynb", model="smollm2-135m", device="cpu",
                        relations=["country_capital", "country_language", "noun_pronoun"], max_pairs=30, n_random=2,
                        max_heads=8, figures_dir=str(tmp_path / "fig"), results_dir=str(tmp_path / "res"))
    assert (tmp_path / "fig" / "smollm2-135m" / "03_ablation_curves_zero.png").is_file()
    out = tmp_path / "res" / "smollm2-135m" / "ablation" / "zero"
    for name in ("tasks", "heads", "controls", "curves", "summary"):
        assert (out / f"{name}.csv").is_file(), name
        assert (out / f"{name}.manifest.json").is_file(), name
    assert "Removing relation heads: accuracy drop ≥ 32% in" in text
    assert "#Heads removed" in text


@pytest.mark.embedded
def test_descriptions_notebook_runs_offline_with_executable_descriptions(smollm2, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    text = run_notebook("04_salient_descriptions.ipynb", tmp_path / "04.ipynb", model="smollm2-135m", device="cpu",
                        n_heads=12, n_random=12, figures_dir=str(tmp_path / "fig"), results_dir=str(tmp_path / "res"))
    assert "LLM describer: none (offline: executable descriptions only)" in text
    assert "12 heads described, 12 random heads, 6 relation heads" in text
    assert "Verified:" in text and "random heads" in text and "mean_gold_score" in text
    assert "No LLM describer" in text
    out = tmp_path / "res" / "smollm2-135m"
    for name in ("descriptions.csv", "descriptions.ops.csv", "descriptions.evidence.csv", "descriptions.manifest.json",
                 "descriptions.executable.csv", "descriptions.executable.families.csv",
                 "descriptions.executable.validity.csv", "descriptions.executable.manifest.json"):
        assert (out / name).is_file(), name
    assert not (out / "descriptions.cache.jsonl").exists()  # no LLM was asked anything
    assert (pd.read_csv(out / "descriptions.csv").describer == "executable").all()
    for ext in ("png", "svg"):
        assert (tmp_path / "fig" / "smollm2-135m" / f"04_verified_by_quartile.{ext}").is_file()


@pytest.mark.embedded
def test_descriptions_notebook_with_a_server_shows_failures_and_never_the_key(smollm2, tmp_path, monkeypatch):
    from maps_utils.describe.client import SERVER_KEY_ENV

    from ..describe.test_describe import OPENAI_SECRET, SECRET, Scripted

    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)
    monkeypatch.setenv(SERVER_KEY_ENV, SECRET)
    srv = Scripted([("status", 400, f"bad request {SECRET}"),  # not retried; fails that head only
                    ("ok", '{"Reasoning": "r", "Input strings": "Words.", "Observed pattern": "Plurals."}')])
    try:
        text = run_notebook("04_salient_descriptions.ipynb", tmp_path / "04.ipynb", model="smollm2-135m",
                            device="cpu", heads="[[2, 3], [21, 4]]", base_url=srv.url, describer_model="scripted-model",
                            score=False, target_min_score=None, n_random=4, figures_dir=str(tmp_path / "fig"), results_dir=str(tmp_path / "res"))
    finally:
        srv.shutdown()
        srv.server_close()
    assert srv.requests[0]["auth"] == f"Bearer {SECRET}"
    assert "describer: scripted-model (http://127.0.0.1:" in text
    assert "(failed: BadRequestError" in text and "[redacted]" in text and "Plurals." in text
    for path in [tmp_path / "04.ipynb", *(tmp_path / "res").rglob("*")]:
        if path.is_file():
            body = path.read_text(errors="replace")
            assert SECRET not in body and OPENAI_SECRET not in body, path


def test_human_study_notebook_without_annotations_says_so_and_renders_the_material(tmp_path):
    from ..human.test_human_study import write_descriptions

    write_descriptions(tmp_path / "res")
    text = run_notebook("05_human_study.ipynb", tmp_path / "05.ipynb", model="tiny-model", n_items=8,
                        results_dir=str(tmp_path / "res"), figures_dir=str(tmp_path / "fig"),
                        annotations_dir=str(tmp_path / "ann"))
    assert "8 items from" in text and "=== item-001" in text
    assert "No annotations yet" in text and "does not invent or simulate judgments" in text
    assert "Chart B (correctness) needs annotations; none yet." in text
    assert "Chart C (kinds) needs annotations; none yet." in text
    assert "Agreement needs annotations; none yet." in text
    study = tmp_path / "res" / "tiny-model" / "human_study"
    assert {p.name for p in (study / "sheets").iterdir()} == {"annotator-1.csv", "annotator-2.csv"}
    assert (tmp_path / "fig" / "tiny-model" / "05_describer_outcome.png").is_file()
    assert not (tmp_path / "ann").exists()  # nothing was written in the annotators' place
    assert "No automatic check found" in text


def test_human_study_notebook_shows_the_automatic_check_labelled_as_such(tmp_path):
    from maps_utils.human import material as HS

    from ..human.test_human_study import write_descriptions

    desc = write_descriptions(tmp_path / "res")
    key = HS.build_material(desc, n=8, seed=0).key
    scores = pd.DataFrame({"describer": "llm", "layer": key.layer, "head": key["head"], "has_pattern": True,
                           "score": [0.9, 0.5, 0.8, 0.6, 0.75, 0.4, 1.0, 0.55], "control_score": 0.5,
                           "judged": "judged"})
    scores.to_csv(tmp_path / "res" / "tiny-model" / "detection.csv", index=False)
    text = run_notebook("05_human_study.ipynb", tmp_path / "05.ipynb", model="tiny-model", n_items=8,
                        results_dir=str(tmp_path / "res"), figures_dir=str(tmp_path / "fig"),
                        annotations_dir=str(tmp_path / "ann"))
    assert "Automatic check (not human): 4 of 8 study items' descriptions verified" in text
    assert "needs annotations and notebook 04's automatic check" in text


def test_human_study_notebook_analyses_fixture_annotations(tmp_path):
    from maps_utils.human import material as HS

    from ..human.test_human_study import A, B, _fixture_annotations, write_descriptions

    desc = write_descriptions(tmp_path / "res")
    _fixture_annotations(tmp_path / "ann", HS.build_material(desc, n=8, seed=0), {"a": A, "b": B})
    common = dict(model="tiny-model", n_items=8, results_dir=str(tmp_path / "res"), figures_dir=str(tmp_path / "fig"),
                  annotations_dir=str(tmp_path / "ann"), n_boot=200)
    text = run_notebook("05_human_study.ipynb", tmp_path / "05.ipynb", **common)
    assert "2 annotator(s), 16 answered rows on 8 of 8 items (16 complete)" in text
    assert "pattern_observable: Cohen kappa 0.75" in text and "raw agreement 88%" in text
    assert "description_correct: Cohen kappa 0.64" in text
    assert "Described patterns judged correct: 38% of 8 answers" in text
    assert "3 answers were on items where it gave no usable answer" not in text  # pooled over both: 6
    assert "6 answers were on items where it gave no usable answer (left out)" in text
    for name in ("05_correctness", "05_kinds"):
        assert (tmp_path / "fig" / "tiny-model" / f"{name}.png").is_file()
    # annotating: the view is shown, and the analysis and the describer's name are not
    text = run_notebook("05_human_study.ipynb", tmp_path / "05b.ipynb", annotator="dave", **common)
    assert "application/vnd.jupyter.widget-view+json" in text
    shown = outputs_text(tmp_path / "05b.ipynb")
    assert "(analysis hidden while annotating)" in shown and "Cohen kappa" not in shown and "judged correct" not in shown
    assert "tiny (test)" not in shown  # the describer stays hidden from annotators
    assert not (tmp_path / "ann" / "dave.csv").exists()  # nothing is written until dave answers
