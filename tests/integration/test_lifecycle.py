"""No describer outlives its run: notebook 04 under papermill (as `make all` runs it) is interrupted while the local
model is describing, by Ctrl-C of papermill, SIGTERM of the kernel and SIGKILL of the kernel; afterwards no process
of that run is left (the local describer runs inside the kernel, so the kernel is the process to look for)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.embedded
@pytest.mark.parametrize("target,sig", [("papermill", signal.SIGINT), ("kernel", signal.SIGTERM),
                                        ("kernel", signal.SIGKILL)])
def test_no_describer_process_outlives_an_interrupted_run(smollm2, model_cache, tmp_path, target, sig):
    cmd = [str(Path(os.sys.executable).parent / "papermill"), "--log-output", "04_salient_descriptions.ipynb",
           str(tmp_path / "04.ipynb"), "-p", "describer_model", "smollm2-135m", "-p", "n_heads", "3", "-p", "n_random", "4",
           "-p", "score", "False", "-p", "results_dir", str(tmp_path / "res"), "-p", "figures_dir", str(tmp_path)]
    # a Ctrl-C reaches papermill as SIGINT with the default handler, whatever the test runner ignores
    proc = subprocess.Popen(cmd, cwd=ROOT / "notebooks", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    kernels: list[int] = []
    try:
        for line in proc.stdout:  # wait until the local model is describing
            kernels = kernels or _children(proc.pid)
            if "describing (local)" in line:
                break
        else:
            pytest.fail(f"notebook 04 ended before describing (exit {proc.wait()})")
        kernels = _children(proc.pid) or kernels
        assert len(kernels) == 1, kernels
        family = [kernels[0], *_children(kernels[0])]  # the kernel and anything it started
        os.kill(proc.pid if target == "papermill" else kernels[0], sig)
        proc.stdout.close()
        assert proc.wait(timeout=120) != 0  # the run fails, so `make` marks nothing done
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in family if _alive(p)], "the kernel (and the describer in it) outlived the run"
    finally:
        for pid in [proc.pid, *kernels]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
