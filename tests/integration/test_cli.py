"""The `maps` command, `make` and the notebooks' entry points: one sentence, before any work, for every bad
input; --k and the rank cap; Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maps_utils import load
from maps_utils.cli import main
from maps_utils.core.store import RunOptions
from maps_utils.static import scores as SC

from ..conftest import one_sentence, relation_file, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_copying_files_are_scored_at_k1_and_k_can_be_set(tmp_path, cache, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    path = tmp_path / "name_copying.json"
    path.write_text(json.dumps([[f"t{i}", f"t{i}"] for i in range(40)]))
    other = relation_file(tmp_path, "mine", 0)
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


@pytest.fixture
def no_loading(monkeypatch):

    from maps_utils.models import loading as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(models, "_load_pretrained_dir", boom)
    monkeypatch.setattr(models, "_load_gguf", boom)


@pytest.mark.parametrize("bad, expect", [
    (["--device", "cuda"], "TORCH_SPEC"),
    (["--device", "gpu0"], "Unknown device 'gpu0'"),
    (["--dtype", "float64x"], "Unknown dtype 'float64x'"),
    (["--representation", "first-mlp"], "Unknown source representation 'first-mlp'"),
    (["--k", "0"], "--k 0 is out of range: the top-k of the score must be an integer of at least 1"),
    (["--k", "101"], "--k 101 is above --rank-cap 100"),
    (["--device", "cpu:7"], "does not exist: torch addresses the CPU as one device"),
])
def test_bad_options_are_one_sentence_before_loading(bad, expect, tmp_path, cache, capsys, no_loading):
    if bad[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid here")
    assert main(["score", "smollm2-135m", "--results-dir", str(tmp_path / "res"), *bad]) == 2
    assert expect in one_sentence(capsys.readouterr().err)


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
        err = one_sentence(capsys.readouterr().err)
        assert expect in err and "offline" not in err, err


def test_make_checks_options_before_running_anything(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so DEVICE=cuda is valid here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    run = subprocess.run(["make", "-s", "check-options", "DEVICE=cuda"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith("make")]
    assert len(lines) == 1 and "TORCH_SPEC" in lines[0] and "Traceback" not in run.stderr, run.stderr
    for placement, says in ((['DEVICE_MAP={"model.layers.0": 5}'], "'5', which does not exist"),
                            (["MAX_MEMORY=cpu:lots"], "only apply with a device_map"),
                            (["DEVICE_MAP=auto", "MAX_MEMORY=cpu:lots"], "the size 'lots'")):
        run = subprocess.run(["make", "-s", "check-options", *placement], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith("make")]
        assert run.returncode != 0 and len(lines) == 1 and says in lines[0], run.stderr
    run = subprocess.run(["make", "-s", "check-options", "DEVICE_MAP=auto", "MAX_MEMORY=cpu:2GiB,disk:50GiB"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr


def test_k_above_the_rank_cap_gives_no_score(tmp_path, cache, capsys):
    from maps_utils.core.errors import OptionError
    from maps_utils.dynamic import scores as DY

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    rel = relation_file(tmp_path, "r", 3)
    capsys.readouterr()
    assert main(["score", str(ckpt), "--relation", str(rel), "--results-dir", str(tmp_path / "res"),
                 "--k", "100000"]) == 2
    assert "--k 100000 is above --rank-cap 100" in one_sentence(capsys.readouterr().err)
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


def test_ctrl_c_is_one_line_and_exits_130(tmp_path):
    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # Ctrl-C as at a terminal (a background job
            # inherits SIGINT ignored, and Python then raises no KeyboardInterrupt)
            "from maps_utils import cli\n"
            "from maps_utils.static import scores\n"
            "def interrupted(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n"
            "scores.static_scores = interrupted\n"
            f"sys.exit(cli.main(['score', {str(tiny_checkpoint(tmp_path / 'ckpt'))!r}, '--results-dir', {str(tmp_path)!r}]))\n")
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
        err = one_sentence(capsys.readouterr().err)
        assert "afile is a file; set MAPS_CACHE_DIR to a writable folder" in err
