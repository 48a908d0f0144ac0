"""One guard for every parameter with a valid range, checked before anything is loaded.

The CLI, the notebooks' first cells and the entry points all call :func:`check_parameters` with the parameters they were given;
a value out of range is one sentence (:class:`~maps_utils.core.errors.OptionError`) that names the parameter, the value,
the range and what the parameter means. The ranges live in :data:`RANGES`, and the orderings between two parameters
(``k <= rank_cap``, ``n_salient <= n_evidence``) in :data:`ORDERS`, so each is stated once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

from .deprecation import renamed
from .errors import OptionError


@dataclass(frozen=True)
class Range:
    """The values a parameter may take: a number in ``[low, high]`` (``open_low``: above ``low``), an integer when
    ``integer``; None where the parameter allows it (``optional``)."""

    meaning: str
    low: float | None = None
    high: float | None = None
    integer: bool = True
    open_low: bool = False
    optional: bool = True

    def text(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{kind} from {_num(self.low)} to {_num(self.high)}"
        if self.low is not None:
            return f"{kind} {'above' if self.open_low else 'of at least'} {_num(self.low)}"
        return kind

    def admits(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return False
        if self.integer and int(value) != value:
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_SHARE = dict(low=0.0, high=1.0, integer=False)
RANGES: dict[str, Range] = {
    # static and dynamic scores
    "k": Range("the top-k of the score", 1),
    "rank_cap": Range("the rank up to which ranks are exact", 1, 32767),  # ranks are stored as int16
    "tau": Range("the score at which a head implements a relation", **_SHARE),
    "min_pairs": Range("the usable pairs a relation needs", 1),
    "max_pairs": Range("the pairs kept per relation", 1),
    "n_permutations": Range("the permutations of the KV-group test", 1),
    "top": Range("the heads listed per relation", 1),
    # how a step runs
    "seed": Range("the random seed", 0, optional=False),
    "batch_size": Range("the prompts per forward pass", 1),
    "memory_budget_mb": Range("the rank engine's working memory in MB", 0, integer=False, open_low=True),
    # ablation
    "n_random": Range("the random samples drawn", 0),
    "max_heads": Range("the most heads removed", 1),
    "baseline_steps": Range("the steps of the baseline curves", 1),
    "max_controls": Range("the control tasks per relation", 0),
    "max_overlap": Range("the largest share of relation heads a control task may share", **_SHARE),
    "max_base_gap": Range("the largest gap of base accuracy to a control task", **_SHARE),
    "min_base": Range("the base accuracy a task needs", **_SHARE),
    # salient operations and descriptions
    "n_heads": Range("the heads in the sample", 1),
    "n_salient": Range("the salient tokens shown per head", 1),
    "n_evidence": Range("the salient tokens computed per head", 1),
    "n_mappings": Range("the top mappings per salient token", 1),
    "threshold": Range("the balanced accuracy at which a description is verified", **_SHARE),
    "min_fit": Range("the balanced accuracy a description needs on the shown rows", **_SHARE),
    "max_random_share": Range("the share of random heads a family may verify", **_SHARE),
    "target_min_score": Range("the static score that adds a relation head", **_SHARE),
    "max_set": Range("the tokens of a fitted output set", 1),
    "max_tokens": Range("the length of an LLM answer in tokens", 1),
    "timeout": Range("the seconds per request", 0, integer=False, open_low=True),
    "threads": Range("the threads of the local LLM", 1),
    # human study
    "n_items": Range("the heads in the study", 1),
    "n_boot": Range("the bootstrap resamples", 1),
    # QK map
    "offsets": Range("the query-minus-key offsets", 0),
    "key_position": Range("the key's absolute position", 0, optional=False),
    "min_share": Range("the attention share that counts as attending", **_SHARE),
    "n_keys": Range("the salient key tokens per head", 1),
}

CLI_ONLY = frozenset({"top"})  # options of the `maps` command, not notebook parameters

RENAMED: dict[str, tuple[str, ...]] = {
    "variant": ("ov_representation", "representation"),  # notebook 06: the OV scores' representation
    "compare_variants": ("compare_representations",),
    "prompt_variant": ("prompt_style",),
}
"""Notebook parameters renamed in 0.2 (old -> new, the first the notebook defines): :func:`check_namespace` still takes
the old name (papermill's ``-p variant raw``) for one release, with a DeprecationWarning."""

ORDERS: tuple[tuple[str, str, str], ...] = (
    ("k", "rank_cap", "scores are exact only up to the rank cap"),
    ("n_salient", "n_evidence", "the held-out rows are ranks n_salient to n_evidence - 1"),
)


def check_parameters(prefix: str = "", **values) -> dict:
    """Check each given parameter against :data:`RANGES` and :data:`ORDERS`; returns ``values``.

    ``prefix`` is how the sentence spells a parameter (``"--"`` in the CLI: ``--rank-cap``). A name with no range
    is a programming error (``KeyError``), so a parameter cannot be checked under a misspelt name.
    """
    for name, value in values.items():
        rule = RANGES[name]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None and rule.optional and not isinstance(value, (list, tuple)):
                continue
            if not rule.admits(item):
                shown = _shown(prefix, name, item)
                raise OptionError(f"{shown} is out of range: {rule.meaning} must be {rule.text()}; "
                                  f"pass {_spell(prefix, name)} {_example(rule)}.")
    for small, large, why in ORDERS:
        a, b = values.get(small), values.get(large)
        if isinstance(a, Real) and isinstance(b, Real) and a > b:
            raise OptionError(f"{_shown(prefix, small, a)} is above {_shown(prefix, large, b)} ({why}); "
                              f"pass {_spell(prefix, small)} <= {b} or a larger {_spell(prefix, large)}.")
    return values


def _spell(prefix: str, name: str) -> str:
    return f"{prefix}{name.replace('_', '-')}" if prefix else name


def _shown(prefix: str, name: str, value) -> str:
    """``k = 101`` in Python, ``--k 101`` in the CLI."""
    return f"{_spell(prefix, name)} {value!r}" if prefix else f"{name} = {value!r}"


def _example(rule: Range) -> str:
    return f"between {_num(rule.low)} and {_num(rule.high)}" if rule.high is not None else \
        f"{'>' if rule.open_low else '>='} {_num(rule.low)}"


def check_namespace(namespace: dict) -> dict:
    """:func:`check_parameters` every parameter of :data:`RANGES` that ``namespace`` defines (a notebook's ``globals()`` after
    its parameters cell, papermill's values included); returns the checked values. The CLI's own options
    (:data:`CLI_ONLY`) are left out: a notebook may use those names for its own variables.

    A parameter given under its old name (:data:`RENAMED`) is moved to its new one in ``namespace``, with a
    DeprecationWarning naming it."""
    for old, new in RENAMED.items():
        target = next((n for n in new if n in namespace), None)
        if old in namespace and target is not None:
            renamed(f"the notebook parameter {old}", target, stacklevel=3)
            namespace[target] = namespace.pop(old)
    return check_parameters(**{name: namespace[name] for name in RANGES if name in namespace and name not in CLI_ONLY})
