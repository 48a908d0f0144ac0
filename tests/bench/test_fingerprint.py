"""bench/fingerprint.py --against: the numerical bar of a speed-up that may move float32 rounding (issue 38)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("fingerprint", ROOT / "bench" / "fingerprint.py")
FP = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FP)


def _runs(tmp_path, **changes) -> tuple[Path, Path]:
    corr = pd.DataFrame({"relation": ["a", "b"], "r": [0.71234567, 0.5], "p": [1e-5, 0.2], "score": [0.25, 0.5],
                         "seconds": [1.0, 2.0]})
    fid = pd.DataFrame({"layer": [0, 1], "cosine": [0.9, 0.8]})
    for side in ("old", "new"):
        (tmp_path / side / "dynamic").mkdir(parents=True)
        c, f = corr.copy(), fid.copy()
        if side == "new":
            for where, value in changes.items():
                table, column, row = where.split(",")
                row = int(row)
                (c if table == "corr" else f).loc[row, column] = value
            c["seconds"] = [9.0, 9.0]  # how the run went is not compared
        c.to_csv(tmp_path / side / "dynamic" / "correlations.csv", index=False)
        f.to_csv(tmp_path / side / "dynamic" / "fidelity.csv", index=False)
    return tmp_path / "old", tmp_path / "new"


def test_identical_runs_pass(tmp_path, capsys):
    assert FP.main([str(_runs(tmp_path)[1]), "--against", str(tmp_path / "old")]) == 0
    assert "2 tables: 2 bit-identical, 0 within the tolerances" in capsys.readouterr().out


def test_r_within_its_tolerance_and_a_cosine_within_its_relative_one_pass(tmp_path, capsys):
    old, new = _runs(tmp_path, **{"corr,r,0": 0.71238, "fid,cosine,1": 0.8000004})
    assert FP.compare(old, new) == 0
    out = capsys.readouterr().out
    assert "within: dynamic/correlations.csv (largest differences: r: 3.43e-05)" in out
    assert "0 bit-identical, 2 within the tolerances" in out


def test_a_changed_score_or_an_r_past_the_tolerance_fails_and_names_the_row(tmp_path, capsys):
    old, new = _runs(tmp_path, **{"corr,score,1": 0.6})
    assert FP.compare(old, new) == 1
    out = capsys.readouterr().out
    assert "differs: dynamic/correlations.csv (largest differences: score: 0.1)" in out
    assert "'relation': 'b'" in out and "'score': '0.6'" in out
    old, new = _runs(tmp_path / "again", **{"corr,r,1": 0.5002})
    assert FP.compare(old, new) == 1


def test_a_missing_table_fails(tmp_path, capsys):
    old, new = _runs(tmp_path)
    (new / "dynamic" / "fidelity.csv").unlink()
    assert FP.compare(old, new) == 1
    assert "missing on one side: dynamic/fidelity.csv" in capsys.readouterr().out
