"""The run manifest of `make all`: a corrupt one is noticed and started again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maps_utils.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("damage", [b"\xff\xfe{", b'{"steps": {"00": {"seconds": 1', b'{"steps": [1]}',
                                    b'{"steps": {"00": "x"}}', b"null"])
def test_a_corrupt_run_manifest_is_started_again(damage, tmp_path, caplog, capsys):
    path = tmp_path / "res" / "m" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(damage)
    assert main(["run-manifest", "m", "--step", "01", "--seconds", "3", "--results-dir", str(tmp_path / "res")]) == 0
    assert list(json.loads(path.read_text())["steps"]) == ["01"]
    bad_nb = tmp_path / "nb.ipynb"
    bad_nb.write_bytes(b"\x00not a notebook")
    assert main(["run-manifest", "m", "--step", "02", "--seconds", "3", "--results-dir", str(tmp_path / "res"),
                 "--notebook", str(bad_nb)]) == 0
    assert json.loads(path.read_text())["total_seconds"] == 6.0
