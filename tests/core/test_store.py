"""Derived tables are checked against their manifest's record when read."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_derived_tables_are_checked_when_read(tmp_path):
    from maps_utils.core.manifest import DerivedFileError
    from maps_utils.core.store import read_table, write_table

    path = write_table(pd.DataFrame({"a": range(10)}), tmp_path / "heads.csv", {"m": 1})
    assert read_table(path).a.tolist() == list(range(10))
    os.truncate(path, path.stat().st_size - 3)
    with pytest.raises(DerivedFileError, match=r"heads.csv was cut off or changed after it was written \(10 rows .*"
                                               r"8 rows .*\); run again the step"):
        read_table(path)
    (tmp_path / "mine.csv").write_text("a\n1\n")  # a table no manifest records: read as it is
    assert read_table(tmp_path / "mine.csv").a.tolist() == [1]
