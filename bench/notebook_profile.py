"""Where `make all`'s time goes: each notebook's wall time and each step (code cell) inside it, per model.

    python bench/notebook_profile.py reports/smollm2-135m reports/gemma3-270m            # a markdown table per model
    python bench/notebook_profile.py reports/smollm2-135m --min-seconds 5 --csv out.csv  # steps of 5 s or more, and a CSV

It reads what papermill records in every executed notebook (each cell's duration, the notebook's start and end), so
it measures the run that made the reports and runs nothing itself; `make profile` runs `make all` on both embedded
models first (a no-op where their reports are current) and then prints this. A step is named by the heading of the
markdown cell before it and the code cell's first line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd


def _text(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _heading(markdown: str) -> str:
    for line in markdown.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _first_line(code: str) -> str:
    for line in code.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "import ", "from ")):
            return line[:70]
    return code.strip().splitlines()[0][:70] if code.strip() else ""


def notebook_steps(path: Path) -> tuple[float | None, pd.DataFrame]:
    """``(wall seconds, steps)`` of one executed notebook: steps is notebook, cell, section, step, seconds."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    wall = nb.get("metadata", {}).get("papermill", {}).get("duration")
    rows, section = [], ""
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "markdown":
            section = _heading(_text(cell)) or section
            continue
        if cell.get("cell_type") != "code":
            continue
        seconds = cell.get("metadata", {}).get("papermill", {}).get("duration")
        rows.append({"notebook": path.stem, "cell": i, "section": section, "step": _first_line(_text(cell)),
                     "seconds": float(seconds) if seconds is not None else float("nan")})
    return (float(wall) if wall is not None else None), pd.DataFrame(rows)


def profile(report_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(notebooks, steps)`` of a report folder (``reports/<model>``): one row per executed notebook (its wall
    time and the sum of its cells) and one per code cell."""
    books, steps = [], []
    for path in sorted(report_dir.glob("[0-9][0-9]_*.ipynb")):
        wall, cells = notebook_steps(path)
        books.append({"notebook": path.stem, "wall_seconds": wall, "cells_seconds": cells.seconds.sum()})
        steps.append(cells)
    if not books:
        raise SystemExit(f"{report_dir}: no executed notebooks; run `make all` for this model first.")
    return pd.DataFrame(books), pd.concat(steps, ignore_index=True)


def markdown(model: str, books: pd.DataFrame, steps: pd.DataFrame, min_seconds: float) -> str:
    lines = [f"### {model}", "", "| notebook | step | seconds |", "|---|---|---|"]
    for _, book in books.iterrows():
        lines.append(f"| **{book.notebook}** | (whole notebook) | **{book.wall_seconds:,.0f}** |")
        for _, s in steps[(steps.notebook == book.notebook) & (steps.seconds >= min_seconds)].iterrows():
            where = f"{s.section[:40]}: " if s.section else ""
            lines.append(f"| | {where}`{s.step}` | {s.seconds:,.1f} |")
    lines.append(f"| **all notebooks** | | **{books.wall_seconds.sum():,.0f}** "
                 f"({books.wall_seconds.sum() / 60:.1f} min) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+", help="report folders, e.g. reports/smollm2-135m")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="list steps of at least this many seconds")
    parser.add_argument("--csv", type=Path, help="also write every step of every model here")
    args = parser.parse_args(argv)
    every = []
    for folder in args.reports:
        if not folder.is_dir():
            print(f"{folder}: no such report folder; run `make all MODEL={folder.name}` first.", file=sys.stderr)
            return 2
        books, steps = profile(folder)
        print(markdown(folder.name, books, steps, args.min_seconds), end="\n\n")
        every.append(steps.assign(model=folder.name))
    if args.csv:
        pd.concat(every, ignore_index=True).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
