"""`make all SMOKE=1`: every notebook runs, the HTML reports and the atlas are written, a rerun does nothing, and a
failing notebook stops the run loudly. It writes reports/smoke/, results/smoke/ and figures/smoke/ in the checkout."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from maps_utils.scores import TAU

from .test_atlas import _dom

ROOT = Path(__file__).resolve().parents[1]


def _make(*args, timeout=1500):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.embedded
def test_make_all_smoke_runs_every_notebook_writes_the_report_and_is_incremental(smollm2):
    for d in ("reports/smoke", "results/smoke", "figures/smoke"):
        shutil.rmtree(ROOT / d, ignore_errors=True)
    first = _make("all", "SMOKE=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = ROOT / "reports" / "smoke" / "smollm2-135m"
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for name in notebooks:
        assert (report / f"{name}.ipynb").is_file() and (report / f"{name}.html").is_file(), name
        html = (report / f"{name}.html").read_text()
        assert "import maps_utils" not in html and "from maps_utils" not in html  # the reading copy hides code
    assert "report: reports/smoke/smollm2-135m/" in first.stdout
    # the run manifest has every step, with its wall time and parameters
    run = json.loads((ROOT / "results" / "smoke" / "smollm2-135m" / "manifest.json").read_text())
    assert sorted(run["steps"]) == notebooks and run["model"]["sha256"] and run["git_commit"]
    assert run["steps"]["03_ablation"]["parameters"]["max_pairs"] == 30 and run["seeds"]["03_ablation"] == 0
    # the atlas, in a real headless browser: the grid, and a search answered from the run's own scores
    atlas = report / "atlas.html"
    table = pd.read_csv(ROOT / "results" / "smoke" / "smollm2-135m" / "static" / "first_mlp" / "scores.csv")
    strong = table[(table.relation == "name_copying") & (table.score >= TAU)]
    dom = _dom(atlas, "q=name_copying")
    assert len(re.findall(r'class="cell[^"]*" data-head=', dom)) == 270
    assert set(re.findall(r'<a data-head="(\d+\.\d+)"', dom)) == {f"{r.layer}.{r.head}" for r in strong.itertuples()}
    # nothing changed: nothing runs
    second = _make("all", "SMOKE=1")
    assert second.returncode == 0 and "papermill" not in second.stdout and "maps atlas" not in second.stdout


def test_a_failing_notebook_stops_make_all_loudly():
    out = _make("all", "SMOKE=1", "MODEL=no-such-model-xyz", timeout=600)
    assert out.returncode != 0
    assert "make: notebook notebooks/00_model_overview.ipynb FAILED" in out.stderr
    assert not (ROOT / "reports" / "smoke" / "no-such-model-xyz" / "00_model_overview.ipynb").exists()
    shutil.rmtree(ROOT / "reports" / "smoke" / "no-such-model-xyz", ignore_errors=True)
