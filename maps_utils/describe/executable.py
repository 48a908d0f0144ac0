"""Executable descriptions: fitted on a head's shown salient operations, verified by execution on held-out ones.

For each head, the describer sees its shown rows (salient ranks ``< n_salient``, the paper's 15). A description
is a pair (input condition, operation) of :class:`~maps_utils.describe.predicates.Clause` s, either of which may be empty.
It is **fitted** by trying every pair of clauses (the fixed ones, plus the output sets, associates and centroids
fitted on the shown rows) and keeping the one with the best balanced accuracy between the head's shown rows and
the *background*, the other heads' shown rows. A description whose fit is below ``min_fit`` is "no pattern".

It is **verified** by execution on rows it never saw: the head's held-out rows (salient ranks ``n_salient`` to
``n_evidence - 1``, 16-40) against as many held-out rows of other heads (seeded). The score is the balanced
accuracy; a head is verified at ``threshold`` (0.75). Two controls travel with every run:

* the **shuffled control**: each head's rows judged by another head's description (should sit near 0.5);
* **random heads**: heads of the same model with random value and output weights, fitted and verified the same way
  (:mod:`maps_utils.describe.exec_study`). A family that verifies them describes any linear map and is not admitted.

No LLM is involved; the sentence a person reads is generated from the fitted clauses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.params import check_parameters
from .detection_stats import THRESHOLD
from .predicates import MAX_SET, Clause, Embedding, Row, output_sets, truth

MIN_FIT = 0.75  # balanced accuracy on shown vs background rows a description needs to be stated at all
N_RANDOM = 40  # random-weight heads per run (the control of :mod:`maps_utils.describe.exec_study`)


@dataclass(frozen=True)
class ExecOptions:
    """The executable describer's choices (defaults are this study's; the paper used GPT-4o and people)."""

    min_fit: float = MIN_FIT
    threshold: float = THRESHOLD
    max_set: int = MAX_SET
    n_random: int = N_RANDOM
    seed: int = 0

    def __post_init__(self):
        check_parameters(min_fit=self.min_fit, threshold=self.threshold, max_set=self.max_set,
                         n_random=self.n_random, seed=self.seed)


@dataclass(frozen=True)
class Description:
    """A fitted description: an input condition and an operation (either may be None), its fit on the shown
    rows (balanced accuracy against the background) and the share of shown rows it holds on."""

    condition: Clause | None
    operation: Clause | None
    fit: float
    shown_share: float

    def follows(self, row: Row) -> bool:
        cond = self.condition is None or _holds(self.condition, row)
        return cond and (self.operation is None or _holds(self.operation, row))

    @property
    def family(self) -> str:
        """E.g. "input class + output set", "copy", "input centroid"."""
        return " + ".join(c.family for c in (self.condition, self.operation) if c is not None)

    @property
    def n_params(self) -> int:
        return sum(c.n_params for c in (self.condition, self.operation) if c is not None)

    @property
    def sentence(self) -> str:
        """The description a person reads, generated from the clauses."""
        if self.operation is None:
            return f"The head's salient inputs are {self.condition.phrase}."
        if self.condition is None:
            return f"The head {self.operation.phrase}."
        return f"For inputs that are {self.condition.phrase}, the head {self.operation.phrase}."

    @property
    def inputs(self) -> str:
        return f"Mostly {self.condition.phrase}." if self.condition is not None else "Any input."

    @property
    def clauses(self) -> str:
        return " & ".join(c.label for c in (self.condition, self.operation) if c is not None)


def _holds(clause: Clause, row: Row) -> bool:
    return bool(clause.test(row.source_id)) if clause.family == "input centroid" else clause.holds(row)


def rows_of(ops: pd.DataFrame) -> dict[tuple[int, int], list[Row]]:
    """``{(layer, head): [Row, …]}`` in rank order, from a salient-operations table (mappings as lists or JSON)."""
    out: dict = {}
    for r in ops.sort_values(["layer", "head", "rank"]).itertuples():
        maps = json.loads(r.mappings) if isinstance(r.mappings, str) else list(r.mappings)
        ids = json.loads(r.mapping_ids) if isinstance(r.mapping_ids, str) else list(r.mapping_ids)
        out.setdefault((int(r.layer), int(r.head)), []).append(
            Row(str(r.token), tuple(str(m) for m in maps), int(r.token_id), tuple(int(i) for i in ids)))
    return out


# ---- fitting ------------------------------------------------------------------------------------------
class Describer:
    """Fits descriptions against a fixed background, with every fixed clause evaluated once on every row."""

    def __init__(self, fixed: Sequence[Clause], embedding: Embedding | None, options: ExecOptions = ExecOptions()):
        self.fixed = list(fixed)
        self.embedding = embedding
        self.options = options
        if embedding is not None:
            self.fixed.append(embedding.associates_clause(embedding.tokens))
        self._cache: dict[Row, np.ndarray] = {}

    def _fixed_truth(self, rows: Sequence[Row]) -> np.ndarray:
        """[n_fixed, n_rows] truth of the fixed clauses (cached per row)."""
        todo = [r for r in dict.fromkeys(rows) if r not in self._cache]
        if todo:
            m = np.stack([truth(c, todo) for c in self.fixed])  # [n_fixed, n_todo]
            self._cache.update({r: m[:, i] for i, r in enumerate(todo)})
        return np.stack([self._cache[r] for r in rows], axis=1) if rows else np.zeros((len(self.fixed), 0), bool)

    def candidates(self, shown: Sequence[Row]) -> list[Clause]:
        """Every clause a head may use: the fixed ones and those fitted on its shown rows."""
        fitted = output_sets(shown, self.options.max_set)
        if self.embedding is not None:
            fitted += self.embedding.centroid_clauses(shown)
        return self.fixed + fitted

    def fit(self, shown: Sequence[Row], background: Sequence[Row], families: set[str] | None = None) -> Description:
        """The best (condition, operation) pair by balanced accuracy of shown vs background rows; ties go to fewer
        parameters, then to the earlier clause. A condition may be the union of two input classes (unions of
        output classes verified random heads: a random head's top outputs often hold a pronoun or a bracket).
        ``families`` restricts the clauses to those families."""
        clauses = self.candidates(shown)
        ts = self._truth(clauses, shown)  # [n_clauses, S]
        tb = self._truth(clauses, background)  # [n_clauses, B]
        keep = [i for i, c in enumerate(clauses) if families is None or c.family in families]
        conds = _with_unions([i for i in keep if clauses[i].side == "input"], clauses, ts, tb, "input class")
        ops = _with_unions([i for i in keep if clauses[i].side == "output"], clauses, ts, tb, None)
        pos = conds.shown @ ops.shown.T / max(ts.shape[1], 1)  # [nC, nO] share of shown rows that follow
        neg = conds.back @ ops.back.T / max(tb.shape[1], 1)  # share of background rows that follow
        fit = (pos + 1 - neg) / 2
        fit[0, 0] = -1  # an empty description is not a description
        params = np.add.outer(conds.params, ops.params)
        best = int(np.lexsort((params.ravel(), -np.round(fit.ravel(), 9)))[0])
        ci, oi = divmod(best, fit.shape[1])
        return Description(conds.clause(ci, clauses), ops.clause(oi, clauses), float(fit[ci, oi]),
                           float(pos[ci, oi]))

    def _truth(self, clauses: list[Clause], rows: Sequence[Row]) -> np.ndarray:
        fixed = self._fixed_truth(rows)
        extra = clauses[len(self.fixed):]
        if not extra:
            return fixed
        return np.vstack([fixed, np.stack([truth(c, rows) for c in extra])])


@dataclass
class _Options:
    """Candidate conditions (or operations): index 0 is the empty one, then single clauses, then unions of two
    clauses of the union family, as float truth matrices over shown and background rows."""

    members: list[tuple[int, ...]]
    shown: np.ndarray
    back: np.ndarray
    params: np.ndarray

    def clause(self, i: int, clauses: list[Clause]) -> Clause | None:
        if i == 0:
            return None
        m = self.members[i]
        return clauses[m[0]] if len(m) == 1 else union(clauses[m[0]], clauses[m[1]])


def _with_unions(idx: list[int], clauses: list[Clause], ts: np.ndarray, tb: np.ndarray,
                 family: str | None) -> _Options:
    members: list[tuple[int, ...]] = [()] + [(i,) for i in idx]
    fam = [i for i in idx if clauses[i].family == family]
    pairs = [(a, b) for k, a in enumerate(fam) for b in fam[k + 1:]]
    members += pairs
    s = [np.ones(ts.shape[1], bool)] + [ts[i] for i in idx]
    b = [np.ones(tb.shape[1], bool)] + [tb[i] for i in idx]
    if pairs:
        ia, ib = np.array(pairs).T
        s += list(ts[ia] | ts[ib])
        b += list(tb[ia] | tb[ib])
    params = np.array([sum(clauses[i].n_params for i in m) for m in members])
    return _Options(members, np.array(s, np.float32), np.array(b, np.float32), params)


def union(a: Clause, b: Clause) -> Clause:
    """A clause that holds where ``a`` or ``b`` does (two classes of the same side)."""
    def test(*args) -> bool:
        return bool(a.test(*args)) or bool(b.test(*args))

    phrase = f"{a.phrase} or {b.phrase.removeprefix('writes ')}" if a.side == "output" else f"{a.phrase} or {b.phrase}"
    return Clause(a.family, a.side, f"{a.label}|{b.label.split(':', 1)[-1]}", phrase, test, a.n_params + b.n_params)


# ---- verification -----------------------------------------------------------------------------------------
def balanced(labels: np.ndarray, selected: np.ndarray) -> float:
    y, s = np.asarray(labels, bool), np.asarray(selected, bool)
    if not y.any() or y.all():
        return float("nan")
    return float((s[y].mean() + (~s[~y]).mean()) / 2)


def judged_rows(head: tuple, held: dict, shown: dict, rng: np.random.Generator,
                exclude: set | None = None) -> list[tuple[Row, bool]]:
    """The head's held-out rows (True) and as many held-out rows of other heads (False) whose source is none of
    the head's sources, drawn with ``rng``; heads in ``exclude`` give no negatives."""
    pos = held[head]
    mine = {r.source for r in pos} | {r.source for r in shown.get(head, [])}
    pool = [r for other in sorted(held) if other != head and other not in (exclude or set())
            for r in held[other] if r.source not in mine]
    take = rng.choice(len(pool), size=min(len(pos), len(pool)), replace=False) if pool else []
    rows = [(r, True) for r in pos] + [(pool[i], False) for i in take]
    return [rows[i] for i in rng.permutation(len(rows))]


def score(desc: Description | None, rows: Sequence[tuple[Row, bool]]) -> float:
    """Balanced accuracy of ``desc`` on labelled rows; 0.5 for no description (it selects nothing)."""
    if desc is None:
        return 0.5
    return balanced(np.array([y for _, y in rows]), np.array([desc.follows(r) for r, _ in rows]))


def background_for(head: tuple, shown: dict, exclude: set | None = None) -> list[Row]:
    """Other heads' shown rows whose source is none of the head's shown sources."""
    mine = {r.source for r in shown[head]}
    return [r for other in sorted(shown) if other != head and other not in (exclude or set())
            for r in shown[other] if r.source not in mine]


# ---- one run: fit, verify, control -------------------------------------------------------------------------
def _pick(rng: np.random.Generator, candidates: list) -> tuple | None:
    return candidates[int(rng.integers(len(candidates)))] if candidates else None


def fit_and_verify(shown: dict, held: dict, describer: Describer, *, options: ExecOptions = ExecOptions(),
                   pool_shown: dict | None = None, pool_held: dict | None = None,
                   pool_descriptions: dict | None = None,
                   families: set[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Describe every head of ``shown`` and verify it on ``held``; one row per head, and the descriptions.

    ``pool_*`` (default: the heads themselves) give the background for fitting, the negatives for verification
    and the shuffled controls' descriptions; a head's own rows never serve as its background or negatives.
    ``families`` restricts the describer to those predicate families.
    """
    pool_shown = shown if pool_shown is None else pool_shown
    pool_held = held if pool_held is None else pool_held
    rng = np.random.default_rng(options.seed)
    fitted = {h: describer.fit(shown[h], background_for(h, {**pool_shown, h: shown[h]}), families)
              for h in sorted(shown)}
    descs = {h: (d if d.fit >= options.min_fit else None) for h, d in fitted.items()}
    controls = descs if pool_descriptions is None else pool_descriptions
    out = []
    for h in sorted(shown):
        rows = judged_rows(h, {**pool_held, h: held[h]}, {**pool_shown, h: shown[h]}, rng)
        partner = _pick(rng, [o for o in sorted(controls) if o != h and controls[o] is not None])
        d, f = descs[h], fitted[h]
        s = score(d, rows)
        c = score(controls[partner], rows) if partner is not None else float("nan")
        out.append({"layer": h[0], "head": h[1], "has_pattern": d is not None, "family": d.family if d else "",
                    "clauses": f.clauses, "sentence": d.sentence if d else "Unclear",
                    "inputs": d.inputs if d else "Unclear", "fit": f.fit, "shown_share": f.shown_share,
                    "n_params": f.n_params, "fitted_family": f.family, "score": s,
                    "verified": bool(s >= options.threshold), "n_positives": sum(y for _, y in rows),
                    "n_negatives": sum(not y for _, y in rows),
                    "control_head": f"{partner[0]}.{partner[1]}" if partner else "",
                    "control_family": controls[partner].family if partner else "", "control_score": c})
    return pd.DataFrame(out), descs

