"""Dynamic scores' caches: keyed by the weights' hash, and a subset query keeps the full table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from maps_utils import load
from maps_utils.core.store import RunOptions

from ..conftest import relation_file, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_dynamic_cache_is_keyed_by_the_weights_hash(tmp_path, cache):
    from maps_utils.dynamic import scores as DY

    a = load(str(tiny_checkpoint(tmp_path / "a")), device="cpu")
    b = load(str(tiny_checkpoint(tmp_path / "b", scale=2.0)), device="cpu")
    assert a.weights_sha256 and a.weights_sha256 != b.weights_sha256
    assert a.manifest()["weights_sha256"] == a.weights_sha256
    rel = relation_file(tmp_path, "mine", 3)
    kw = dict(templates=["t1 t2 <X>"], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    DY.dynamic_scores(a, [rel], **kw)
    assert DY.dynamic_scores(a, [rel], **kw).reused == ["mine"]
    b.name = a.name  # the same name and folder, other weights
    assert DY.dynamic_scores(b, [rel], **kw).reused == []
    assert DY.dynamic_scores(b, [rel], **kw).manifest["parameters"]["weights_sha256"] == b.weights_sha256


def test_a_dynamic_subset_query_keeps_the_full_table(tmp_path, cache):
    from maps_utils.dynamic import scores as DY

    loaded = load(str(tiny_checkpoint(tmp_path / "ckpt")), device="cpu")
    rels = [relation_file(tmp_path, name, shift) for name, shift in (("a", 1), ("b", 2))]
    kw = dict(templates=["t1 t2 <X>"], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    DY.dynamic_scores(loaded, rels, **kw)
    table = next((tmp_path / "res").rglob("scores.csv"))
    rows = pd.read_csv(table)
    assert DY.dynamic_scores(loaded, rels[1:], **kw).reused == ["b"]
    assert sorted(pd.read_csv(table).relation.unique()) == ["a", "b"]
    pd.testing.assert_frame_equal(pd.read_csv(table).sort_values(list(rows.columns)).reset_index(drop=True),
                                  rows.sort_values(list(rows.columns)).reset_index(drop=True))
