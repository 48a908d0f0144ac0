"""Fingerprints of a run's result tables, to prove a refactor leaves every table bit-identical.

    python bench/fingerprint.py results/smollm2-135m > before.json      # before the change
    python bench/fingerprint.py results/smollm2-135m --check before.json  # after it: exit 1 on any difference

Each CSV under the folder is read as text (no float re-formatting), the columns that record how a run went rather
than what it found (wall times, cache hits, attempts) are dropped, and the rest is hashed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

VOLATILE = ("seconds", "cached", "attempts", "wall_seconds")


def fingerprint(path: Path) -> dict:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    kept = table.drop(columns=[c for c in VOLATILE if c in table.columns])
    digest = hashlib.sha256(kept.to_csv(index=False).encode()).hexdigest()
    return {"rows": len(kept), "columns": len(kept.columns), "sha256": digest}


def fingerprints(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): fingerprint(p) for p in sorted(folder.rglob("*.csv"))
            if not any(part.startswith(".") for part in p.parts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folder", type=Path, help="a results folder, e.g. results/smollm2-135m")
    parser.add_argument("--check", type=Path, help="fingerprints written before; report every table that differs")
    args = parser.parse_args(argv)
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
