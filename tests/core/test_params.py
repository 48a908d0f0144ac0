"""The one guard for parameters (issue 35): every range in one table, checked before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maps_utils.core import params as PM
from maps_utils.core.errors import OptionError
from maps_utils.report.run_manifest import notebook_defaults

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))


def _bad_values(rule: PM.Range) -> list:
    bad = [True, "3", float("nan")]
    if rule.low is not None:
        bad.append(rule.low if rule.open_low else rule.low - 1)
    if rule.high is not None:
        bad.append(rule.high + 1)
    if rule.integer:
        bad.append((rule.low or 0) + 1.5)
    if not rule.optional:
        bad.append(None)
    return bad


@pytest.mark.parametrize("name", list(PM.RANGES))
def test_every_range_refuses_its_bad_values_in_one_sentence(name):
    rule = PM.RANGES[name]
    good = rule.high if rule.high is not None else (rule.low or 0) + 1
    assert PM.check_parameters(**{name: good}) == {name: good}
    for bad in _bad_values(rule):
        with pytest.raises(OptionError) as caught:
            PM.check_parameters(**{name: bad})
        text = str(caught.value)
        assert text.startswith(f"{name} = {bad!r} is out of range: {rule.meaning} must be ") and "\n" not in text


def test_orderings_and_cli_spelling():
    with pytest.raises(OptionError, match=r"^n_salient = 20 is above n_evidence = 10 \(the held-out rows"):
        PM.check_parameters(n_salient=20, n_evidence=10)
    with pytest.raises(OptionError, match=r"^--k 101 is above --rank-cap 100 .*pass --k <= 100 or a larger --rank-cap"):
        PM.check_parameters("--", k=101, rank_cap=100)
    with pytest.raises(OptionError, match=r"^offsets = -1 is out of range"):
        PM.check_parameters(offsets=[1, -1])
    with pytest.raises(KeyError):
        PM.check_parameters(kk=3)  # a misspelt name is a programming error, never silently unchecked
    assert PM.check_parameters(k=None, max_pairs=None) == {"k": None, "max_pairs": None}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_numeric_notebook_parameter_has_a_range_and_its_default_passes(path):
    defaults = notebook_defaults(json.loads(path.read_text()))
    numeric = {n for n, v in defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               or isinstance(v, list) and v and all(isinstance(x, int) for x in v)}
    assert numeric <= set(PM.RANGES), numeric - set(PM.RANGES)
    PM.check_namespace(defaults)
    assert "check_namespace(globals())" in path.read_text()


def test_entry_points_check_before_any_work():
    """Each entry point refuses a bad value before it touches its model (None here)."""
    from maps_utils.ablation import experiment as ablation
    from maps_utils.core.store import RunOptions
    from maps_utils.describe import exec_study
    from maps_utils.describe.executable import ExecOptions
    from maps_utils.dynamic import scores as dynamic
    from maps_utils.human import agreement
    from maps_utils.human.material import build_material
    from maps_utils.qk.circuit import QKOptions
    from maps_utils.static import scores

    calls = {
        "seed = -1": lambda: RunOptions(seed=-1),
        "batch_size = 0": lambda: RunOptions(batch_size=0),
        "memory_budget_mb = 0": lambda: RunOptions(memory_budget_mb=0),
        "min_fit = 1.5": lambda: ExecOptions(min_fit=1.5),
        "rank_cap = 0": lambda: scores.static_scores(None, rank_cap=0),
        "min_pairs = 0": lambda: dynamic.dynamic_scores(None, min_pairs=0),
        "k = 0": lambda: dynamic.multi_token_scores(None, k=0),
        "n_random = -1": lambda: ablation.causal_experiment(None, None, n_random=-1),
        "max_overlap = 2": lambda: ablation.causal_experiment(None, None, max_overlap=2),
        "n_heads = 0": lambda: exec_study.describe_executable(None, n=0),
        "n_salient = 40 is above n_evidence = 15": lambda: exec_study.describe_executable(None, n_salient=40,
                                                                                          n_evidence=15),
        "n_salient = n_evidence = 15": lambda: exec_study.describe_executable(None, n_evidence=15),
        "n_items = 0": lambda: build_material("nowhere.csv", n=0),
        "n_boot = 0": lambda: agreement.kappa_by_question(None, n_boot=0),
        "offsets = -2": lambda: QKOptions(offsets=(1, -2)).check(None),
        "key_position = -1": lambda: QKOptions(key_position=-1).check(None),
    }
    for expect, call in calls.items():
        with pytest.raises(OptionError, match=expect.replace("(", r"\(")):
            call()
