"""`make all SMOKE=1`: every notebook runs, the HTML reports and the atlas are written, a rerun does nothing, and a
failing notebook stops the run loudly. It writes reports/smoke/, results/smoke/ and figures/smoke/ in the checkout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from maps_utils.static.scores import TAU

from ..report.test_atlas import _dom

ROOT = Path(__file__).resolve().parents[2]


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
    # notebook 06 (SMOKE_06: two relations, 30 pairs, one template): its tables, and the atlas panel's QK keys
    qk = ROOT / "results" / "smoke" / "smollm2-135m" / "qk"
    for name in ("validation", "joint", "correlations", "salient_keys"):
        assert (qk / f"{name}.csv").is_file() and (qk / f"{name}.manifest.json").is_file(), name
    corr = pd.read_csv(qk / "correlations.csv").set_index("relation")
    assert set(corr.index) == {"name_copying", "country_capital"} and corr[["r_ov", "r_joint"]].notna().all().all()
    validation = pd.read_csv(qk / "validation.csv")
    assert set(validation.prompt_set) == {"relation", "distractor"} and len(validation) == 2 * 2 * 270
    assert (ROOT / "figures" / "smoke" / "smollm2-135m" / "06_qk_map.png").is_file()
    shown = re.search(r'<pre id="qk-keys">(.*?)</pre>', _dom(atlas, "head=23.4"), re.S)
    keys = pd.read_csv(qk / "salient_keys.csv", keep_default_na=False)
    assert shown and len(shown.group(1).splitlines()) == int(((keys["layer"] == 23) & (keys["head"] == 4)).sum())
    # notebook 04 (SMOKE_04: 8 heads, 8 random heads): executable descriptions, and the atlas panel shows them
    ex = pd.read_csv(ROOT / "results" / "smoke" / "smollm2-135m" / "descriptions.executable.csv")
    assert len(ex) == 8 and {"sentence", "score", "control_score", "verified"} <= set(ex.columns)
    first_head = ex.iloc[0]
    shown = _dom(atlas, f"head={first_head.layer}.{first_head['head']}")
    assert '<p id="executable">' in shown and ("<b>verified</b>" in shown or "not verified" in shown)
    # one forward pass per prompt set: notebook 02's dynamic pass kept what the fidelity profile and notebook 06 read
    results = ROOT / "results" / "smoke" / "smollm2-135m"
    assert sorted(p.stem for p in (results / "dynamic" / "readouts").glob("*.pt")) == ["country_capital", "name_copying"]
    # (SMOKE_02 leaves out the fidelity profile; tests/dynamic/test_readouts.py shows it reads them too)
    qk_manifest = json.loads((qk / "correlations.manifest.json").read_text())
    assert sorted(qk_manifest["parameters"]["attention_from_the_dynamic_pass"]) == ["country_capital", "name_copying"]
    # nothing changed: nothing runs
    second = _make("all", "SMOKE=1")
    assert second.returncode == 0 and "papermill" not in second.stdout and "maps atlas" not in second.stdout
    # the profile of that run: every notebook's wall time as papermill recorded it, and its steps
    profile = _make("profile", "SMOKE=1", "PROFILE_MODELS=smollm2-135m")
    assert profile.returncode == 0 and "papermill" not in profile.stdout, profile.stdout[-2000:] + profile.stderr
    for name in notebooks:
        wall = json.loads((report / f"{name}.ipynb").read_text())["metadata"]["papermill"]["duration"]
        assert f"| **{name}** | (whole notebook) | **{wall:,.0f}** |" in profile.stdout
    assert "`dyn = DY.dynamic_scores(loaded, relations, templates" in profile.stdout


def test_a_failing_notebook_stops_make_all_loudly():
    out = _make("all", "SMOKE=1", "MODEL=no-such-model-xyz", timeout=600)
    assert out.returncode != 0
    assert "make: notebook notebooks/00_model_overview.ipynb FAILED" in out.stderr
    assert not (ROOT / "reports" / "smoke" / "no-such-model-xyz" / "00_model_overview.ipynb").exists()
    shutil.rmtree(ROOT / "reports" / "smoke" / "no-such-model-xyz", ignore_errors=True)


def test_a_changed_parameter_or_force_reruns_the_notebooks_and_an_unchanged_one_does_not(tmp_path):
    """The parameter stamp, with `make -n` (nothing runs): fake up-to-date reports in a temporary report folder."""
    report, venv = tmp_path / "report", tmp_path / "venv"
    venv.mkdir()
    base = ["SMOKE=1", f"REPORT_DIR={report}", f"VENV={venv}"]
    stamp = report / ".params"
    made = _make(str(stamp), *base, timeout=60)  # a real run: writes the stamp of these parameters, runs nothing
    assert made.returncode == 0 and stamp.is_file(), made.stderr
    sources = [*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "maps_utils").rglob("*.py"), ROOT / "pyproject.toml"]
    t = max(time.time() - 2, *(f.stat().st_mtime + 0.01 for f in sources))
    os.utime(stamp, (t - 100, t - 100))
    (venv / ".maps-setup-stamp").touch()
    os.utime(venv / ".maps-setup-stamp", (t, t))
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for f in [*(f"{n}.ipynb" for n in notebooks), *(f"{n}.html" for n in notebooks), "atlas.html"]:
        (report / f).write_text("{}")
        os.utime(report / f, (t, t))
    before = (stamp.read_bytes(), stamp.stat().st_mtime_ns)

    def planned(*args):
        out = _make("-n", "all", *base, *args, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.count("/papermill ")

    assert planned() == 0  # same parameters: up to date
    assert planned("DTYPE=bfloat16") == len(notebooks)
    assert planned("PAPERMILL_ARGS=-y '{max_pairs: 5, relations: [a, b]}' -p note \"x\"") == len(notebooks)
    assert planned("FORCE=1") == len(notebooks)
    assert (stamp.read_bytes(), stamp.stat().st_mtime_ns) == before  # a dry run writes nothing
    # a real run with a changed parameter rewrites the stamp (then the notebooks are older than it); unchanged: kept
    assert _make(str(stamp), *base, "DTYPE=bfloat16", timeout=60).returncode == 0
    assert b"DTYPE=bfloat16" in stamp.read_bytes() and stamp.stat().st_mtime > t
    rewritten = stamp.stat().st_mtime_ns
    assert planned("DTYPE=bfloat16") == len(notebooks)
    assert _make(str(stamp), *base, "DTYPE=bfloat16", timeout=60).returncode == 0
    assert stamp.stat().st_mtime_ns == rewritten
