"""Fingerprints of a run's result tables, to prove a refactor leaves every table bit-identical.

    python bench/fingerprint.py results/smollm2-135m > before.json      # before the change
    python bench/fingerprint.py results/smollm2-135m --check before.json  # after it: exit 1 on any difference
    python bench/fingerprint.py results/smollm2-135m --against old/results/smollm2-135m   # the numerical bar

Each CSV under the folder is read as text (no float re-formatting), the columns that record how a run went rather
than what it found (wall times, cache hits, attempts) are dropped, and the rest is hashed.

``--against`` compares two runs' tables value by value under the numerical bar of a speed-up that may move float32
rounding (issue 38): correlations (:data:`R_COLUMNS`: Pearson r, their p-values, Spearman's rho) within
``--r-tolerance`` (1e-4); measurements that are means of float32 quantities rather than scores at k
(:data:`MEASURE_COLUMNS`: cosines, saliency, attention shares) within ``--measure-tolerance`` relative (1e-5); every
other column (scores at k, categories, relation-head choices, ablation accuracies, counts, text) identical. Every
table that is not bit-identical is listed with its largest difference per column, and every row whose exact columns
differ is printed, so each can be traced (e.g. to a float32 tie). Exit 1 when the bar does not hold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

VOLATILE = ("seconds", "cached", "attempts", "wall_seconds")
R_COLUMNS = ("r", "p", "r_ov", "r_joint", "r_oracle", "r_joint − r_ov", "spearman", "relation r w/o", "relation r w/",
             "suppression r w/o", "suppression r w/", "mean r")
MEASURE_COLUMNS = ("cosine", "saliency", "attraction", "static_on_source", "real_on_source")


def fingerprint(path: Path) -> dict:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    kept = table.drop(columns=[c for c in VOLATILE if c in table.columns])
    digest = hashlib.sha256(kept.to_csv(index=False).encode()).hexdigest()
    return {"rows": len(kept), "columns": len(kept.columns), "sha256": digest}


def fingerprints(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): fingerprint(p) for p in sorted(folder.rglob("*.csv"))
            if not any(part.startswith(".") for part in p.parts)}


def _numeric(col: pd.Series) -> pd.Series | None:
    values = pd.to_numeric(col.replace("", "nan"), errors="coerce")
    return values if values.notna().sum() == (col != "").sum() else None


def compare_table(old: Path, new: Path, r_tol: float, measure_tol: float) -> dict:
    """One table of two runs under the numerical bar: ``{"status", "columns": {name: largest difference}, "rows"}``
    (status ``identical``, ``within`` the tolerances, or ``differs``; ``rows``: the rows whose exact columns differ)."""
    a, b = (pd.read_csv(p, dtype=str, keep_default_na=False) for p in (old, new))
    a, b = (t.drop(columns=[c for c in VOLATILE if c in t.columns]) for t in (a, b))
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return {"status": "differs", "columns": {}, "rows": [f"shape {a.shape} -> {b.shape}"]}
    if a.equals(b):
        return {"status": "identical", "columns": {}, "rows": []}
    columns, bad_rows, ok = {}, set(), True
    for name in a.columns:
        if a[name].equals(b[name]):
            continue
        x, y = _numeric(a[name]), _numeric(b[name])
        if x is None or y is None:
            bad_rows |= set(a.index[a[name] != b[name]])
            columns[name] = "text differs"
            ok = False
            continue
        both_nan = x.isna() & y.isna()
        diff = (x - y).abs().where(~both_nan, 0.0).fillna(float("inf"))
        columns[name] = float(diff.max())
        if name in R_COLUMNS:
            ok &= columns[name] <= r_tol
        elif name in MEASURE_COLUMNS:
            ok &= bool((diff <= measure_tol * x.abs().clip(lower=1.0)).all())
        else:
            bad_rows |= set(a.index[diff > 0])
            ok = False
    rows = [f"{a.loc[i].to_dict()} -> {b.loc[i].to_dict()}" for i in sorted(bad_rows)]
    return {"status": "within" if ok else "differs", "columns": columns, "rows": rows}


def compare(old: Path, new: Path, r_tol: float = 1e-4, measure_tol: float = 1e-5) -> int:
    """Print every table of ``new`` against ``old`` (see ``--against``); 1 when the bar does not hold."""
    names = sorted(set(fingerprints(old)) | set(fingerprints(new)))
    counts = {"identical": 0, "within": 0, "differs": 0}
    for name in names:
        if not (old / name).is_file() or not (new / name).is_file():
            print(f"missing on one side: {name}")
            counts["differs"] += 1
            continue
        got = compare_table(old / name, new / name, r_tol, measure_tol)
        counts[got["status"]] += 1
        if got["status"] != "identical":
            largest = ", ".join(f"{c}: {v:.3g}" if isinstance(v, float) else f"{c}: {v}"
                                for c, v in got["columns"].items())
            print(f"{got['status']}: {name} (largest differences: {largest})")
            for row in got["rows"][:20]:
                print(f"    {row}")
            if len(got["rows"]) > 20:
                print(f"    ... {len(got['rows']) - 20} rows more")
    print(f"{len(names)} tables: {counts['identical']} bit-identical, {counts['within']} within the tolerances "
          f"(r {r_tol:g}, measures {measure_tol:g} relative), {counts['differs']} differ")
    return 1 if counts["differs"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folder", type=Path, help="a results folder, e.g. results/smollm2-135m")
    parser.add_argument("--check", type=Path, help="fingerprints written before; report every table that differs")
    parser.add_argument("--against", type=Path, help="another run's results folder: compare under the numerical bar")
    parser.add_argument("--r-tolerance", type=float, default=1e-4)
    parser.add_argument("--measure-tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    if args.against is not None:
        return compare(args.against, args.folder, args.r_tolerance, args.measure_tolerance)
    now = fingerprints(args.folder)
    if args.check is None:
        print(json.dumps(now, indent=1))
        return 0
    before = json.loads(args.check.read_text())
    differ = sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
    for name in differ:
        print(f"differs: {name}: {before.get(name)} -> {now.get(name)}")
    print(f"{len(before.keys() & now.keys()) - len([d for d in differ if d in before and d in now])} tables identical, "
          f"{len(differ)} differ or are missing on one side")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
