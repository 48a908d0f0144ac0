"""Static scores' caches: keyed by the weights' content, one slot per relation, a smaller query never shrinks the
table, concurrent writers serialised, cut-off or corrupt files rebuilt, an interrupted run resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from maps_utils import load
from maps_utils.cli import main
from maps_utils.core.store import RunOptions, model_slug
from maps_utils.static import scores as SC

from ..conftest import relation_file, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_changed_weights_at_the_same_path_are_recomputed(tmp_path, cache, capsys):
    ckpt, rel = tiny_checkpoint(tmp_path / "ckpt"), relation_file(tmp_path, "mine", 3)
    args = ["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res"), "--device", "cpu"]
    assert main(args) == 0 and "written to" in capsys.readouterr().out
    assert main(args) == 0 and "read from" in capsys.readouterr().out  # unchanged: reused
    before = pd.read_csv(next((tmp_path / "res").rglob("scores.csv")))
    tiny_checkpoint(ckpt, scale=-1.0)  # new weights, same path: W_O negated turns top tokens into bottom ones
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "written to" in out and "read from" not in out
    after = pd.read_csv(next((tmp_path / "res").rglob("scores.csv")))
    assert not before.score.equals(after.score) and after.score.equals(before.suppression_score)


def test_an_updated_hugging_face_checkpoint_is_recomputed(tmp_path, cache, monkeypatch):
    """A Hugging Face id whose cached snapshot changes (a new revision downloaded) gets a new weights hash."""
    import huggingface_hub.constants as hc

    hub = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo = hub / "models--maps-test--tiny"

    def publish(revision: str, scale: float) -> None:
        tiny_checkpoint(repo / "snapshots" / revision, scale)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)

    publish("a" * 40, 1.0)
    first = load("maps-test/tiny", device="cpu")
    assert first.source == "huggingface: maps-test/tiny"
    rel = relation_file(tmp_path, "mine", 3)
    SC.static_scores(first, [rel], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    assert SC.static_scores(first, [rel],
                            run=RunOptions(results_dir=tmp_path / "res", progress=False)).from_cache
    publish("b" * 40, -1.0)
    second = load("maps-test/tiny", device="cpu")
    assert second.weights_sha256 != first.weights_sha256
    assert not SC.static_scores(second, [rel],
                                run=RunOptions(results_dir=tmp_path / "res", progress=False)).from_cache


def test_a_subset_query_reads_the_full_run_and_keeps_its_table(tmp_path, cache, monkeypatch):
    from maps_utils.static import ranks as S

    loaded = load(str(tiny_checkpoint(tmp_path / "ckpt")), device="cpu")
    rels = [relation_file(tmp_path, name, shift) for name, shift in (("a", 1), ("b", 2), ("c", 3))]
    full = SC.static_scores(loaded, rels, run=RunOptions(results_dir=tmp_path / "res", progress=False))
    table = next((tmp_path / "res").rglob("scores.csv"))
    rows = pd.read_csv(table)
    calls = []
    real = S.layer_ranks
    monkeypatch.setattr(S, "layer_ranks", lambda *a, **k: calls.append(1) or real(*a, **k))
    sub = SC.static_scores(loaded, rels[1:2], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    assert calls == [] and sub.from_cache
    assert torch.equal(sub.ranks_of("b")[0], full.ranks_of("b")[0])
    assert pd.read_csv(table).equals(rows)  # still all three relations
    d = relation_file(tmp_path, "d", 4)
    SC.static_scores(loaded, [d], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    assert len(calls) == loaded.weights.n_layers  # only d was computed
    assert list(pd.read_csv(table).relation.unique()) == ["d", "a", "b", "c"]


def test_a_smaller_cap_reads_the_default_caps_ranks_clamped_and_computes_only_the_rest(tmp_path, cache, monkeypatch):
    """A query at rank cap 10 (notebook 02's grid) reads every relation the default cap stored, its ranks clamped
    (the same numbers below 10), computes only the others at cap 10 in ranks-cap10/, and scores.csv is the same text
    a default-cap run writes."""
    from maps_utils.static import ranks as S

    loaded = load(str(tiny_checkpoint(tmp_path / "ckpt")), device="cpu")
    rels = [relation_file(tmp_path, name, shift) for name, shift in (("a", 1), ("b", 2), ("c", 3))]
    run = RunOptions(results_dir=tmp_path / "res", progress=False)
    full = SC.static_scores(loaded, rels[:2], run=run)
    calls, real = [], S.layer_ranks
    monkeypatch.setattr(S, "layer_ranks", lambda *a, **k: calls.append(k["rank_cap"]) or real(*a, **k))
    small = SC.static_scores(loaded, rels, rank_cap=10, run=run)
    assert calls == [10] * loaded.weights.n_layers and small.manifest["parameters"]["computed"] == ["c"]
    for name in ("a", "b"):
        assert torch.equal(small.ranks_of(name)[0], full.ranks_of(name)[0].clamp(max=10))
        assert torch.equal(small.score_map(name), full.score_map(name))
    folder = tmp_path / "res" / model_slug(loaded.name) / "static" / "first_mlp"
    assert sorted(p.stem for p in (folder / "ranks-cap10").glob("*.pt")) == ["c"]
    alone = SC.static_scores(loaded, rels, run=RunOptions(results_dir=tmp_path / "alone", progress=False))
    assert (folder / "scores.csv").read_text() == next((tmp_path / "alone").rglob("scores.csv")).read_text()
    assert torch.equal(small.score_map("c"), alone.score_map("c"))
    with pytest.raises(ValueError, match="rank_cap"):
        small.score_map("c", k=20)  # past the cap is refused, not guessed
    calls.clear()
    again = SC.static_scores(loaded, rels, rank_cap=10, run=run)
    assert calls == [] and again.from_cache


def test_a_skipped_relation_is_named_with_its_count(tmp_path, cache, capsys, caplog):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    small, big = relation_file(tmp_path, "small", 1, n=12), relation_file(tmp_path, "big", 2)
    assert main(["score", str(ckpt), "--relation", str(small), str(big), "--results-dir", str(tmp_path / "res"),
                 "--device", "cpu"]) == 0
    assert "skipped small: 12 usable single-token pairs (fewer than 30)" in capsys.readouterr().err
    assert "relation small skipped: 12 usable" in caplog.text


def test_concurrent_writers_of_different_relations_both_keep_their_results(tmp_path, cache):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    rels = [relation_file(tmp_path, name, shift) for name, shift in (("a", 1), ("b", 2))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "maps_utils.cli", "score", str(ckpt), "--relation", str(rel),
                               "--results-dir", str(tmp_path / "res"), "--device", "cpu"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rel in rels]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    table = pd.read_csv(next((tmp_path / "res").rglob("scores.csv")))
    assert sorted(table.relation.unique()) == ["a", "b"]


def test_corrupt_slots_and_partial_checkpoints_are_recomputed(tmp_path, cache, caplog):
    loaded = load(str(tiny_checkpoint(tmp_path / "ckpt")), device="cpu")
    rel = relation_file(tmp_path, "mine", 5)
    ref = SC.static_scores(loaded, [rel], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    folder = next((tmp_path / "res").rglob("ranks"))
    slot = folder / "mine.pt"
    slot.write_bytes(slot.read_bytes()[:100])  # truncated
    (folder / "partial.pt").write_bytes(b"not a checkpoint")
    again = SC.static_scores(loaded, [rel], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    assert not again.from_cache and torch.equal(again.ranks.top, ref.ranks.top)
    assert "could not be read" in caplog.text
    assert SC.static_scores(loaded, [rel],
                            run=RunOptions(results_dir=tmp_path / "res", progress=False)).from_cache


def _scores_csv(results: Path, ckpt: Path) -> Path:
    from maps_utils.core.store import model_slug

    return results / model_slug(str(ckpt)) / "static" / "first_mlp" / "scores.csv"


def test_a_cut_off_scores_table_is_rebuilt_from_its_slots(tmp_path, cache, caplog):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    rel = relation_file(tmp_path, "r", 3)
    args = ["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res")]
    assert main(args) == 0
    table = _scores_csv(tmp_path / "res", ckpt)
    whole = table.read_bytes()
    os.truncate(table, len(whole) // 2)  # cut mid-row
    assert main(args) == 0
    assert "scores.csv was cut off or changed after it was written" in caplog.text
    assert table.read_bytes() == whole
    at = whole.rindex(b"first_mlp")
    table.write_bytes(whole[:at] + b"first_mlq" + whole[at + 9:])  # an edited cell, same size
    assert main(args) == 0
    assert table.read_bytes() == whole


@pytest.mark.parametrize("damage", [b"garbage{", b"\xff\xfe{", b'{"files": ', b"[1, 2]"])
def test_a_corrupt_static_manifest_is_noticed_and_rewritten(damage, tmp_path, cache, caplog):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    rel = relation_file(tmp_path, "r", 3)
    args = ["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res")]
    assert main(args) == 0
    manifest = _scores_csv(tmp_path / "res", ckpt).with_name("manifest.json")
    manifest.write_bytes(damage)
    assert main(args) == 0
    assert "manifest.json" in caplog.text
    record = json.loads(manifest.read_text())
    rows = len(pd.read_csv(manifest.with_name("scores.csv")))
    assert record["files"]["scores.csv"]["rows"] == rows and record["parameters"]["variant"] == "first_mlp"


def test_ctrl_c_keeps_the_finished_layers_and_the_next_run_resumes(tmp_path, cache, monkeypatch):
    ckpt, rel = tiny_checkpoint(tmp_path / "ckpt"), relation_file(tmp_path, "r", 3)
    loaded, run = load(str(ckpt)), RunOptions(results_dir=tmp_path / "res", progress=False)
    whole = SC.static_scores(loaded, [str(rel)], run=RunOptions(results_dir=None, progress=False)).table()
    real = SC.target_ranks

    def interrupted_after_one_layer(*args, on_layer, layers, **kw):
        real(*args, layers=layers[:1], on_layer=on_layer, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(SC, "target_ranks", interrupted_after_one_layer)
    with pytest.raises(KeyboardInterrupt):
        SC.static_scores(loaded, [str(rel)], run=run)
    asked = []
    monkeypatch.setattr(SC, "target_ranks", lambda *a, layers, **kw: asked.append(list(layers)) or real(
        *a, layers=layers, **kw))
    assert SC.static_scores(loaded, [str(rel)], run=run).table().equals(whole)
    assert asked == [list(range(1, loaded.weights.n_layers))]  # layer 0 came from the interrupted run
