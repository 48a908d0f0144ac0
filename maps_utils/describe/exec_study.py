"""Notebook 04's offline describer as one step: executable descriptions of a head sample, calibrated on random heads.

1. **Random heads.** The same model with every attention layer's value and output projections replaced by Gaussian
   matrices of the same scale (seeded, restored afterwards). Their salient operations are read like the real ones
   (with the parameter-only ``first_mlp_all`` representation, whatever the real heads use, so the control costs
   seconds). A random head has salient operations too: its salient inputs cluster and it writes a consistent set of
   tokens, so a family that verifies random heads describes any linear map, not what a head learned.
2. **Family admission.** Each predicate family alone is fitted and verified on the real heads and on the random
   heads. A family that verifies more than ``max_random_share`` of the random heads is not admitted (reported, with
   its rates).
3. **Descriptions.** The admitted families describe every sampled head (:mod:`maps_utils.describe.executable`), verified on
   held-out rows with shuffled controls; the random heads get the same describer (their verified share is the
   false-positive rate).
4. **Relation heads** (static score >= ``target_min_score`` on copying, name copying, first letter, capital) are
   described the same way, with background, negatives and controls drawn from the sample's non-relation heads.
5. **Judge validity.** The relation heads' gold descriptions (their relation, as a clause and as a sentence) are
   judged by execution, against controls drawn from non-relation heads (:func:`judge_validity`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.deprecation import renamed_arguments
from ..core.errors import OptionError
from ..core.io import atomic_write_text
from ..core.manifest import build_manifest, write_manifest
from ..core.params import check_parameters
from ..core.store import RunOptions, result_folder
from ..relations import load_all
from ..static.salient import salient_operations
from .detection import _judge_llm, _score, static_target_heads
from .detection_stats import bootstrap_ci
from .executable import Describer, Description, ExecOptions, fit_and_verify, judged_rows, rows_of, score
from .pipeline import salient_ops
from .predicates import Clause, Embedding, fixed_clauses
from .sampling import layer_quartile, quartile_labels, select_heads

MAX_RANDOM_SHARE = 0.05  # a family verifying more of the random heads than this describes any linear map
GOLD = {  # relation -> (clause label, sentence): what a relation head is known to do
    "copying": ("copy", "copies the input token"),
    "name_copying": ("copy", "copies the input token (a name)"),
    "word_first_letter": ("first_letter", "maps a word to its first letter"),
    "country_capital": ("relation:country_capital", "maps a country to its capital city"),
}


@dataclass
class ExecutableResult:
    """Executable descriptions of the sample (``table``), the relation heads (``relations``), the random heads
    (``random``), per-family admission (``families``), judge validity (``validity``) and the manifest."""

    model: str
    table: pd.DataFrame
    random: pd.DataFrame
    families: pd.DataFrame
    n_layers: int
    manifest: dict
    relations: pd.DataFrame | None = None
    validity: pd.DataFrame | None = None
    rows: dict = field(default_factory=dict, repr=False)  # (layer, head) -> [Row] (shown then held-out)
    options: ExecOptions = field(default_factory=ExecOptions)
    ops: pd.DataFrame | None = field(default=None, repr=False)  # salient operations, ranks 0..n_evidence-1

    def summary(self, n_boot: int = 2000) -> pd.DataFrame:
        """Per head set: heads, with a description, verified (count and share), mean score, mean shuffled control,
        and the true-minus-control gap with its bootstrap 95% CI over heads."""
        out = []
        for name, t in (("sample", self.table), ("relation heads", self.relations), ("random heads", self.random)):
            if t is None or not len(t):
                continue
            both = t.dropna(subset=["score", "control_score"])
            gap = (both.score - both.control_score).to_numpy()
            lo, hi = bootstrap_ci(gap, n_boot=n_boot, seed=self.options.seed)
            out.append({"heads": name, "n": len(t), "with_description": int(t.has_pattern.sum()),
                        "verified": int(t.verified.sum()), "share_verified": float(t.verified.mean()),
                        "mean_score": float(t.score.mean()), "mean_control": float(t.control_score.mean()),
                        "gap": float(gap.mean()) if len(gap) else float("nan"), "gap_ci_low": lo, "gap_ci_high": hi})
        return pd.DataFrame(out)

    def by_quartile(self) -> pd.DataFrame:
        """Per layer quartile: sampled heads and the share with a verified executable description."""
        t = self.table.assign(quartile=[layer_quartile(la, self.n_layers) for la in self.table.layer])
        g = t.groupby("quartile")
        return pd.DataFrame({"quartile": range(4), "layers": quartile_labels(self.n_layers),
                             "n_heads": g.size().reindex(range(4), fill_value=0).to_numpy(),
                             "verified_executable": g.verified.mean().reindex(range(4)).to_numpy()})

    def verified(self) -> pd.DataFrame:
        """The verified heads of the sample and the relation heads: description, score and control."""
        parts = [t.assign(set=name) for name, t in (("sample", self.table), ("relation heads", self.relations))
                 if t is not None and len(t)]
        t = pd.concat(parts, ignore_index=True)
        t = t[t.verified].sort_values(["score", "layer", "head"], ascending=[False, True, True])
        return t[["set", "layer", "head", "sentence", "family", "score", "control_score"]].reset_index(drop=True)

    def evidence(self, layer: int, head: int, n: int = 10) -> str:
        """A head's held-out rows (ranks ``n_salient``..), each marked ``+`` where its description holds."""
        desc = self._descriptions.get((layer, head))
        rows = self.rows[(layer, head)][self._n_salient:]
        lines = [f"  {'+' if desc is not None and desc.follows(r) else ' '} {r.source!r:>18} -> "
                 + ", ".join(repr(t) for t in r.targets) for r in rows[:n]]
        return "\n".join(lines)

    _descriptions: dict = field(default_factory=dict, repr=False)
    _n_salient: int = 15
    gold: list = field(default_factory=list, repr=False)  # the GoldCase s of the judge-validity check

    def llm_validity(self, describer, progress: bool = True) -> pd.DataFrame:
        """An LLM judge on the same gold cases as :attr:`validity` (rows, gold sentences and controls)."""
        return judge_validity_llm(self.gold, self._descriptions, describer, progress=progress)

    def as_descriptions(self) -> pd.DataFrame:
        """The sample's descriptions in the layout of notebook 04's ``descriptions.csv`` (describer
        "executable"), which notebook 05 and the atlas read when no LLM described the heads."""
        t = self.table
        tokens = self.ops[self.ops["rank"] < self._n_salient].groupby(["layer", "head"]).token.agg(
            lambda s: ", ".join(repr(x)[1:-1] for x in s))
        return pd.DataFrame({
            "layer": t.layer, "head": t["head"], "quartile": t.quartile,
            "salient_tokens": [tokens.get((la, h), "") for la, h in zip(t.layer, t["head"], strict=True)],
            "has_pattern": t.has_pattern, "pattern": t.sentence, "inputs": t.inputs, "reasoning": t.clauses,
            "parse": "executable", "status": "ok", "error": "", "raw": t.clauses, "describer": "executable",
            "score": t.score, "control_score": t.control_score, "verified": t.verified})

    def write(self, results_dir: str | Path, name: str = "descriptions", primary: bool = True) -> Path:
        """``<name>.executable.csv`` (and ``.relations``, ``.random``, ``.families``, ``.validity``) and the
        manifest ``<name>.executable.manifest.json`` under ``results/<model>/``. ``primary``: also the
        salient operations (``<name>.ops.csv`` shown, ``<name>.evidence.csv`` held out) and ``<name>.csv`` in the
        common layout (:meth:`as_descriptions`), as when no LLM describes the heads."""
        import json

        out = result_folder(results_dir, self.model)
        if primary and self.ops is not None:
            ops = self.ops.assign(mappings=self.ops.mappings.map(json.dumps),
                                  mapping_ids=self.ops.mapping_ids.map(json.dumps))
            atomic_write_text(out / f"{name}.ops.csv", ops[ops["rank"] < self._n_salient].to_csv(index=False))
            atomic_write_text(out / f"{name}.evidence.csv", ops[ops["rank"] >= self._n_salient].to_csv(index=False))
            atomic_write_text(out / f"{name}.csv", self.as_descriptions().to_csv(index=False))
            write_manifest(out / f"{name}.manifest.json", self.manifest,
                           files=[out / f"{name}{s}.csv" for s in (".ops", ".evidence", "")])
        written = []
        for suffix, t in (("", self.table), (".relations", self.relations), (".random", self.random),
                          (".families", self.families), (".validity", self.validity)):
            if t is not None:
                written.append(atomic_write_text(out / f"{name}.executable{suffix}.csv", t.to_csv(index=False)))
        write_manifest(out / f"{name}.executable.manifest.json", self.manifest, files=written)
        return out / f"{name}.executable.csv"


# ---- random heads -------------------------------------------------------------------------------------
@torch.no_grad()
def random_head_ops(loaded, heads: Sequence[tuple[int, int]], *, n_salient: int = 40, n_mappings: int = 5,
                    seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Salient operations of ``heads`` in the model with random value and output projections (Gaussian, each
    tensor's own standard deviation; seeded). The model's parameters are restored before returning."""

    w = loaded.weights
    if w.streamed:  # its parameters live on disk or another device: an edit in place would be silently lost
        raise OptionError(f"The random-weight control edits {loaded.name}'s W_V and W_O in memory, and this model's "
                          "weights are streamed or offloaded; run notebook 04 with stream=False and no device_map.")
    g = torch.Generator().manual_seed(seed)
    params = {id(p): p for layer in range(w.n_layers)
              for module in (w.v_module(layer), w.out_proj_module(layer)) for p in module.parameters()}
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        for p in params.values():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_((noise * p.detach().float().std()).to(p.dtype))
        return salient_operations(w, loaded.tokenizer, n_tokens=n_salient, n_mappings=n_mappings,
                                  representation="first_mlp_all", heads_subset=list(heads), progress=progress)
    finally:
        for k, p in params.items():
            p.copy_(saved[k])


# ---- families ---------------------------------------------------------------------------------------------
def family_admission(describer: Describer, shown: dict, held: dict, r_shown: dict, r_held: dict,
                     options: ExecOptions, max_random_share: float = MAX_RANDOM_SHARE) -> pd.DataFrame:
    """Each family alone, on the real and the random heads: share verified, mean score and shuffled control;
    ``admitted`` when its random heads' verified share is at most ``max_random_share`` (a family admitted alone may
    still be dropped later, ``dropped_in_combination``, when the admitted families together verify random heads)."""
    out = []
    for fam in dict.fromkeys(c.family for c in describer.candidates(next(iter(shown.values())))):
        real, _ = fit_and_verify(shown, held, describer, options=options, families={fam})
        rand, _ = fit_and_verify(r_shown, r_held, describer, options=options, pool_shown=shown, pool_held=held,
                                 families={fam})
        out.append({"family": fam, "real_verified": int(real.verified.sum()), "real_share": float(real.verified.mean()),
                    "real_mean_score": float(real.score.mean()), "real_mean_control": float(real.control_score.mean()),
                    "random_verified": int(rand.verified.sum()), "random_share": float(rand.verified.mean()),
                    "random_mean_score": float(rand.score.mean()),
                    "admitted": bool(rand.verified.mean() <= max_random_share), "dropped_in_combination": False})
    return pd.DataFrame(out)


def family_report(table: pd.DataFrame, families: pd.DataFrame) -> pd.DataFrame:
    """Per family of the chosen descriptions (conditions and operations counted apart): heads described, verified,
    mean score, mean shuffled control (of heads judged by a description of this family), and the admission
    figures of :func:`family_admission`."""
    rows = []
    for fam in families.family:
        uses = table[table.family.str.split(" + ", regex=False).map(lambda fs, fam=fam: fam in fs)]
        ctrl = table[table.control_family.str.split(" + ", regex=False).map(lambda fs, fam=fam: fam in fs)]
        rows.append({"family": fam, "described": len(uses), "verified": int(uses.verified.sum()),
                     "mean_score": float(uses.score.mean()) if len(uses) else float("nan"),
                     "mean_control": float(ctrl.control_score.mean()) if len(ctrl) else float("nan")})
    return pd.DataFrame(rows).merge(families, on="family")


# ---- judge validity ---------------------------------------------------------------------------------------
def gold_clause(relation: str, clauses: Sequence[Clause]) -> Clause:
    label = GOLD[relation][0]
    return next(c for c in clauses if c.label == label)


@dataclass(frozen=True)
class GoldCase:
    """One relation head's gold check: its held-out rows against non-relation heads' rows (labelled), its gold
    description, and the non-relation head whose description is the control on the same rows."""

    head: tuple[int, int]
    relation: str
    rows: tuple  # ((Row, label), ...)
    gold: Description
    partner: tuple[int, int] | None


def gold_cases(targets: pd.DataFrame, rows: dict, pool: dict, controls: dict, describer: Describer, *,
               n_salient: int, seed: int = 0) -> list[GoldCase]:
    """The gold checks of the relation heads in ``targets``: negatives from ``pool`` (non-relation heads' rows),
    controls from the non-relation heads with a description in ``controls`` (drawn with ``seed``)."""
    rng = np.random.default_rng(seed)
    held = {h: r[n_salient:] for h, r in pool.items()}
    shown = {h: r[:n_salient] for h, r in pool.items()}
    partners = [h for h in sorted(controls) if controls[h] is not None]
    out = []
    for t in targets.itertuples():
        head = (int(t.layer), int(t.head))
        gold = Description(None, gold_clause(t.relation, describer.fixed), 1.0, 1.0)
        judged = judged_rows(head, {**held, head: rows[head][n_salient:]}, {**shown, head: rows[head][:n_salient]},
                             rng)
        partner = partners[int(rng.integers(len(partners)))] if partners else None
        out.append(GoldCase(head, t.relation, tuple(judged), gold, partner))
    return out


def judge_validity(cases: Sequence[GoldCase], controls: dict) -> pd.DataFrame:
    """The execution judge on the gold cases: the gold clause and the control head's description, each run on
    the case's rows (balanced accuracy)."""
    return pd.DataFrame([{
        "judge": "execution", "layer": c.head[0], "head": c.head[1], "relation": c.relation,
        "gold": GOLD[c.relation][1], "score": score(c.gold, c.rows),
        "control_head": f"{c.partner[0]}.{c.partner[1]}" if c.partner else "",
        "control_score": score(controls[c.partner], c.rows) if c.partner else float("nan")} for c in cases])


def judge_validity_llm(cases: Sequence[GoldCase], controls: dict, describer, *, progress: bool = True) -> pd.DataFrame:
    """An LLM judge (a :class:`maps_utils.describe.client.Describer`, as notebook 04's detection scoring uses it) on the
    same gold cases: the gold sentence and the control head's generated sentence, judged on the case's rows."""

    rows = {c.head: [{"source": r.source, "mappings": list(r.targets), "label": y} for r, y in c.rows] for c in cases}
    texts = {("gold", *c.head): ("Any input.", f"The head {GOLD[c.relation][1]}.") for c in cases}
    texts |= {("control", *c.partner): (controls[c.partner].inputs, controls[c.partner].sentence)
              for c in cases if c.partner}
    pairs = [(c.head, ("gold", *c.head)) for c in cases] + [(c.head, ("control", *c.partner)) for c in cases
                                                            if c.partner]
    answers = _judge_llm(describer, rows, texts, pairs, progress)
    return pd.DataFrame([{
        "judge": describer.endpoint.label, "layer": c.head[0], "head": c.head[1], "relation": c.relation,
        "gold": GOLD[c.relation][1], "score": _score(rows[c.head], answers.get((c.head, ("gold", *c.head)))),
        "control_head": f"{c.partner[0]}.{c.partner[1]}" if c.partner else "",
        "control_score": _score(rows[c.head], answers.get((c.head, ("control", *c.partner)))) if c.partner
        else float("nan")} for c in cases])


def validity_summary(validity: pd.DataFrame, threshold: float = 0.8) -> pd.DataFrame:
    """Per judge: gold heads, mean gold score, mean control, and whether it may verify anything (mean gold score
    >= ``threshold`` and mean control within 0.4-0.6)."""
    g = validity.groupby("judge", sort=False)
    out = pd.DataFrame({"gold_heads": g.size(), "mean_gold_score": g.score.mean(),
                        "share_gold_verified": g.score.apply(lambda s: float((s >= 0.75).mean())),
                        "mean_control": g.control_score.mean()}).reset_index()
    out["valid"] = (out.mean_gold_score >= threshold) & out.mean_control.between(0.4, 0.6)
    return out


# ---- the whole step ---------------------------------------------------------------------------------------
@renamed_arguments(variant="representation")
def describe_executable(loaded, heads="sample", *, n: int = 40, n_salient: int = 15, n_evidence: int = 40,
                        n_mappings: int = 5, representation: str = "first_mlp_all", target_min_score: float | None = 0.5,
                        options: ExecOptions | None = None, max_random_share: float = MAX_RANDOM_SHARE,
                        ops: pd.DataFrame | None = None, run: RunOptions = RunOptions()) -> ExecutableResult:
    """The executable describer on ``heads`` of ``loaded`` (see the module docstring); written under
    ``results/<model>/`` by :meth:`ExecutableResult.write`. ``ops`` (a
    :func:`maps_utils.describe.pipeline.salient_ops` table with ranks up to ``n_evidence``) is reused when given."""

    check_parameters(n_heads=n, n_salient=n_salient, n_evidence=n_evidence, n_mappings=n_mappings,
                     target_min_score=target_min_score, max_random_share=max_random_share)
    if n_salient == n_evidence:
        raise OptionError(f"n_salient = n_evidence = {n_salient} leaves no held-out rows to verify on; pass "
                          "n_evidence above n_salient.")
    options = options or ExecOptions(seed=run.seed)
    t0 = time.perf_counter()
    w = loaded.weights
    chosen = select_heads(w.n_layers, w.n_heads, heads, n=n, seed=run.seed)
    targets = (static_target_heads(loaded, min_score=target_min_score, run=run) if target_min_score is not None
               else pd.DataFrame(columns=["layer", "head", "relation", "score"]))
    wanted = sorted(set(chosen) | {(int(a), int(b)) for a, b in targets[["layer", "head"]].values})
    if ops is None or not set(wanted) <= set(zip(ops.layer, ops["head"], strict=True)):
        ops = salient_ops(loaded, wanted, n_salient=n_evidence, n_mappings=n_mappings, representation=representation,
                          run=run)
    rows = rows_of(ops)
    r_heads = select_heads(w.n_layers, w.n_heads, "sample", n=max(options.n_random, 1), seed=run.seed + 1)
    r_rows = rows_of(random_head_ops(loaded, r_heads, n_salient=n_evidence, n_mappings=n_mappings,
                                     seed=run.seed, progress=run.progress))
    vocab = [loaded.tokenizer.decode([i]) for i in range(w.vocab_size)]
    emb = Embedding.of(w.E, vocab)
    emb.prepare(r.source_id for rs in (*rows.values(), *r_rows.values()) for r in rs)
    describer = Describer(fixed_clauses(load_all()), emb, options)

    split = _splitter(n_salient, n_evidence)
    target_set = {(int(a), int(b)) for a, b in targets[["layer", "head"]].values}
    pool = [h for h in chosen if h not in target_set]  # the sample's non-relation heads
    shown, held = split(rows, chosen)
    r_shown, r_held = split({(-1, i): r_rows[h] for i, h in enumerate(r_heads)}, None)
    families = family_admission(describer, shown, held, r_shown, r_held, options, max_random_share)
    admitted = set(families[families.admitted].family)
    while True:  # families that verify random heads only together are dropped too, the worst first
        random, _ = fit_and_verify(r_shown, r_held, describer, options=options, pool_shown=shown, pool_held=held,
                                   families=admitted)
        if random.verified.mean() <= max_random_share or not admitted:
            break
        worst = random[random.verified].family.str.split(" + ", regex=False).explode().value_counts().index[0]
        admitted.discard(worst)
        families.loc[families.family == worst, ["admitted", "dropped_in_combination"]] = [False, True]
    table, descs = fit_and_verify(shown, held, describer, options=options, families=admitted)
    relations = validity = None
    cases: list[GoldCase] = []
    if len(targets):
        t_shown, t_held = split(rows, sorted(target_set))
        p_shown, p_held = split(rows, pool)
        relations, t_descs = fit_and_verify(t_shown, t_held, describer, options=options, pool_shown=p_shown,
                                            pool_held=p_held, pool_descriptions={h: descs[h] for h in pool},
                                            families=admitted)
        relations = relations.merge(targets.rename(columns={"score": "static_score"}), on=["layer", "head"])
        descs |= t_descs
        cases = gold_cases(targets, rows, {h: rows[h] for h in pool}, {h: descs[h] for h in pool}, describer,
                           n_salient=n_salient, seed=run.seed)
        validity = judge_validity(cases, descs)
    for t in (table, relations):
        if t is not None:
            t.insert(2, "quartile", [layer_quartile(la, w.n_layers) for la in t.layer])
    # the manifest keeps the names of 0.1 (``variant``: the representation)
    params = {"heads": [list(h) for h in chosen], "n_salient": n_salient, "n_evidence": n_evidence,
              "n_mappings": n_mappings, "variant": representation, "target_min_score": target_min_score,
              "options": asdict(options), "max_random_share": max_random_share, "admitted": sorted(admitted),
              "random_heads": [list(h) for h in r_heads], "random_variant": "first_mlp_all", "seed": run.seed}
    manifest = build_manifest(parameters=params, wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
    sample_ops = ops[[(int(a), int(b)) in set(chosen) for a, b in zip(ops.layer, ops["head"], strict=True)]]
    res = ExecutableResult(str(loaded.name), table, random, family_report(table, families), w.n_layers, manifest,
                           relations, validity, rows, options, sample_ops.reset_index(drop=True), descs, n_salient, cases)
    return res


def _splitter(n_salient: int, n_evidence: int):
    def split(rows: dict, heads) -> tuple[dict, dict]:
        keys = sorted(rows) if heads is None else heads
        return ({h: rows[h][:n_salient] for h in keys}, {h: rows[h][n_salient:n_evidence] for h in keys})

    return split
