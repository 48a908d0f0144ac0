"""The causal experiment (MAPS-SPEC §1.5): removing a relation's heads breaks the relation, removing others does not.

For every relation with a causal template (``"The capital of <X> is"``, ...) the model predicts the next token
greedily at the prompt's last position; it is correct when that token is the target's first token (``" " +
target``), over the single-token-filtered pairs. Then:

* **relation heads**: the top-m heads by static score with score > 0 (stable descending order over the
  flattened layer × head map), m capped by the model's head count (:func:`max_relation_heads`);
* they are **removed cumulatively** in rank order, one more per step, giving an accuracy curve. Removing a head
  replaces its slice of the output projection's input (its z) at the last position only: by zeros (the paper's
  ``zero`` ablation) or by its mean z at the last position over the prompts being evaluated (``mean``: the
  relation's own prompts for its curves and random baselines, a control task's prompts on that task);
* **random baseline**: ``n_random`` samples of as many heads, drawn from the heads that are *not* relation heads,
  removed the same way (mean ± std per step);
* **control tasks**: up to ``max_controls`` other relations, in a seeded random order, whose own relation heads
  overlap this relation's by less than ``max_overlap`` (|∩| / |this relation's heads|) and whose base accuracy is
  within ``max_base_gap`` of this one's; this relation's heads are removed on their prompts;
* relations whose base accuracy is below ``min_base`` are skipped and reported, not hidden.

Speed: removing heads at the last position changes nothing at earlier positions, so every chunk of equal-length
prompts runs its prefix once (keeping the KV cache) and each ablation step is one batched forward pass of the last
token per chunk (the embedded models' causal prompts have one length per relation: one chunk up to ``run.batch_size``).
That pass starts at the step's first ablated layer: the blocks below it give the clean pass's outputs, bit for bit
what running them gives (the manifest's ``block_steps_skipped`` is the share of block evaluations this saves).
Prompts are tokenised with the tokenizer's own special tokens (a BOS where it adds one), as in the dynamic scores.
Every random choice comes from ``run.seed`` and the relation's name, so a rerun gives identical tables. Results are
cached per task (``results/<model>/ablation/<kind>/parts/``): an interrupted run resumes at the next task.

This module chooses the heads and runs the experiment; the prompts and forward passes are in
:mod:`maps_utils.ablation.passes`, the result tables and the paper's layout in :mod:`maps_utils.ablation.result`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from .. import relations as R
from ..core.deprecation import renamed_constants
from ..core.hashing import content_key
from ..core.manifest import build_manifest, call_arguments
from ..core.params import check_parameters
from ..core.store import RunOptions, Slots
from ..models.loading import LoadedModel
from .passes import Head, Task, build_task, curve_steps, mean_last_z, run_curves
from .result import AblationResult
from .selection import max_relation_heads, overlap, random_heads, relation_heads, select_controls

log = logging.getLogger(__name__)

ENGINE_VERSION = 2  # 2: keyed by the weights' hash
ABLATIONS = ("zero", "mean")  # what a removed head's z becomes: zero (the paper's) or its mean
DEFAULT_BATCH = 512  # prompts per forward pass (one chunk for most relations)
PAPER_RELATIONS = ("copying", "name_copying", "word_first_letter", "word_last_letter", "year_following",
                   "country_capital", "country_language", "object_superclass", "product_company",
                   "adj_comparative", "verb_past_tense", "noun_pronoun", "english_spanish")
"""The 13 relations the paper ran the causal experiment on (MAPS-SPEC §2.2); our other relations have causal
templates of our own."""
__getattr__ = renamed_constants(globals(), {"KINDS": "ABLATIONS"})  # renamed in 0.2



def _relation_list(relations) -> list[R.Relation]:
    if relations is None or relations == "paper":
        names = [r for r in PAPER_RELATIONS if r in R.list_relations()]
    elif relations == "all":
        names = R.list_relations()
    elif isinstance(relations, str):
        names = [relations]
    else:
        names = list(relations)
    rels = [R.load(r) if isinstance(r, (str, Path)) else r for r in names]
    seen = [r.name for r in rels]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise ValueError(f"Relations listed more than once: {', '.join(dupes)}; list each relation once.")
    return rels


def causal_experiment(
    loaded: LoadedModel,
    static,
    relations: str | Sequence[str | R.Relation] | None = "paper",
    *,
    kind: str = "zero",
    n_random: int = 5,
    max_heads: int | None = None,
    max_overlap: float = 0.15,
    max_base_gap: float = 0.2,
    max_controls: int = 5,
    min_base: float = 0.1,
    max_pairs: int | None = None,
    min_pairs: int = R.MIN_PAIRS,
    top_k: R.TopK | None = None,
    baseline_steps: int | None = None,
    run: RunOptions = RunOptions(),
) -> AblationResult:
    """Run the causal experiment (module docstring; MAPS-SPEC §1.5) on ``loaded``.

    Args:
        static: the model's :class:`~maps_utils.static.scores.StaticScores`; relation heads come from its score maps at
            each relation's k (``top_k``, default :class:`~maps_utils.relations.TopK`: the paper's 1 / 10).
        relations: ``"paper"`` (the paper's 13 causal relations, default), ``"all"`` (every relation with a
            causal template), or names / :class:`~maps_utils.relations.Relation` objects. Control tasks are drawn
            from the same set.
        kind: ``zero`` (the paper's) or ``mean`` (each head's mean z at the last position over the prompts being
            evaluated: the relation's own, or the control task's).
        max_heads: cap on relation heads (default: :func:`max_relation_heads` of the model's head count).
        max_pairs: a seeded random subset of pairs per relation, for quick runs (None: all, the paper's).
        baseline_steps: evaluate the random-head and control-task curves at this many evenly spread steps, plus
            the table's step (the relation's #heads removed), instead of at every step (None, the paper's figure).
            The relation curves always run every step, so the table is the same either way; only the baselines'
            lines in the curves figure get coarser (8 steps: about a third of the baselines' forward passes at a 30-head cap).
        run: per-task parts (resume) and the tables go under ``<results_dir>/<model>/ablation/<kind>/``;
            ``run.seed`` seeds every random choice, ``run.batch_size`` is the prompts per forward pass (default 512).
    """
    arguments = call_arguments(locals())
    check_parameters(n_random=n_random, max_controls=max_controls, max_heads=max_heads, baseline_steps=baseline_steps,
                     max_overlap=max_overlap, max_base_gap=max_base_gap, min_base=min_base, max_pairs=max_pairs,
                     min_pairs=min_pairs)
    _check(kind, static, loaded)
    exp = _Experiment(loaded, kind, run.batch(DEFAULT_BATCH), run)
    t0 = time.perf_counter()
    L, H = loaded.weights.n_layers, loaded.weights.n_heads
    cap = max_heads if max_heads is not None else max_relation_heads(L * H)
    rels = _relation_list(relations)
    tasks, rel_heads, task_rows, head_rows = _tasks_and_heads(
        loaded, static, rels, cap, max_pairs=max_pairs, seed=run.seed, min_pairs=min_pairs, top_k=top_k or R.TopK())
    base, mean_z = _base_accuracies(exp, tasks)
    valid = _mark_low_base(task_rows, base, min_base)
    randoms, controls, control_rows = _baselines(valid, rel_heads, base, (L, H), n_random, run.seed,
                                                 max_overlap=max_overlap, max_base_gap=max_base_gap,
                                                 max_controls=max_controls)
    plan = _plan(valid, rel_heads, randoms, controls)
    accs, seconds, fresh, skipped = _run_plan(exp, tasks, plan, mean_z, baseline_steps)
    result = _result(loaded.name, kind, task_rows, head_rows, control_rows, _curve_rows(plan, accs, tasks),
                     reused=[t for t in plan if t not in fresh])
    result.manifest = build_manifest(
        parameters={**arguments, **exp.identity, "relations": [r.name for r in rels], "max_heads": cap,
                    "top_k": asdict(top_k or R.TopK()), "static_variant": static.representation,
                    "static_key": static.manifest.get("parameters", {}).get("key"), "controls": controls,
                    "seconds_per_task": seconds, "reused_from_cache": result.reused,
                    "block_steps_skipped": skipped},
        wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
    if exp.out is not None:
        with exp.parts.lock():  # concurrent runs write whole table sets in turn, never a mix of two experiments
            result.write(run.results_dir)
    return result


# ---- the experiment's steps ------------------------------------------------------------------------------
def _check(kind, static, loaded) -> None:
    if kind not in ABLATIONS:
        raise ValueError(f"Unknown ablation kind '{kind}'; use one of {', '.join(ABLATIONS)}.")
    if static.model != loaded.name:
        raise ValueError(f"The static scores are {static.model}'s, not {loaded.name}'s; score this model first "
                         "(maps_utils.static.scores.static_scores(loaded)).")


class _Experiment:
    """What every step of one experiment shares: the model, the ablation kind, the cache slots and their identity."""

    def __init__(self, loaded: LoadedModel, kind: str, batch_size: int, run: RunOptions):
        self.loaded, self.kind, self.batch_size, self.progress = loaded, kind, batch_size, run.progress
        weights = loaded.weights
        self.identity = {"engine_version": ENGINE_VERSION, "model": loaded.name,
                         "weights_sha256": loaded.weights_sha256, "architecture": weights.summary(),
                         "dtype": str(loaded.dtype), "device": str(loaded.device), "batch_size": batch_size}
        self.out = run.folder(loaded.name, "ablation", kind)
        self.parts = Slots(self.out / "parts" if self.out is not None else None, enabled=run.use_cache,
                           weights_only=False)

    def key(self, task: Task, **more) -> str:
        return content_key({**self.identity, "kind": self.kind, "prompts": task.prompts, "targets": task.targets,
                            **more})


@dataclass(frozen=True)
class Curve:
    """One accuracy curve: ``heads`` removed cumulatively on one task's prompts. ``kind`` is one of
    :data:`~maps_utils.ablation.result.CURVE_TYPES`; ``sample`` is a random sample's index or the control task;
    ``owner`` is the relation whose table step a baseline must include (None for a relation curve)."""

    kind: str
    relation: str
    sample: str
    heads: list[Head]
    owner: str | None

    @property
    def label(self) -> tuple[str, str, str]:
        return self.kind, self.relation, self.sample


def _tasks_and_heads(loaded, static, rels, cap, *, max_pairs, seed, min_pairs, top_k):
    """Each relation's task and relation heads, its row of the tasks table (status says why one is skipped), and
    the heads table."""
    L, H = loaded.weights.n_layers, loaded.weights.n_heads
    static_names = {r.name for r in static.relations}
    tasks: dict[str, Task] = {}
    rel_heads: dict[str, list[Head]] = {}
    task_rows, head_rows = [], []
    for rel in rels:
        row = {"relation": rel.name, "category": rel.category, "in_paper": rel.name in PAPER_RELATIONS,
               "template": rel.causal_template, "n_pairs": 0, "demo_overlap": 0, "base": np.nan, "status": "run"}
        task_rows.append(row)
        task, why = build_task(rel, loaded.tokenizer, max_pairs=max_pairs, seed=seed, min_pairs=min_pairs)
        if task is None:
            row["status"] = f"skipped: {why}"
            continue
        row.update(n_pairs=task.n, demo_overlap=task.demo_overlap)
        if rel.name not in static_names:
            row["status"] = "skipped: no static score (score it in notebook 01 first)"
            continue
        smap = static.score_map(rel.name, top_k=top_k)
        if tuple(smap.shape) != (L, H):
            raise ValueError(f"The static scores have {tuple(smap.shape)} layers x heads but the model has {(L, H)}; "
                             "recompute them for this model.")
        chosen = relation_heads(smap, cap)
        if not chosen:
            row["status"] = "skipped: no head has a static score > 0"
            continue
        tasks[rel.name], rel_heads[rel.name] = task, chosen
        head_rows += [{"relation": rel.name, "rank": i + 1, "layer": la, "head": h, "score": float(smap[la, h])}
                      for i, (la, h) in enumerate(chosen)]
    return tasks, rel_heads, task_rows, head_rows


def _base_accuracies(exp: _Experiment, tasks: dict[str, Task]) -> tuple[dict[str, float], dict[str, Tensor | None]]:
    """Each task's accuracy with no head removed (and, for mean ablation, its heads' mean z), cached per task."""
    base, mean_z = {}, {}
    bar = tqdm(total=len(tasks), desc="causal: base accuracy", unit="relation", disable=not exp.progress)
    for name, task in tasks.items():
        bar.set_postfix_str(name)
        key = exp.key(task)
        value = exp.parts.read(f"{name}.base", key)
        if value is None:
            correct, _ = run_curves(exp.loaded, task, [], batch_size=exp.batch_size, restart=False)
            mz = mean_last_z(exp.loaded, task, exp.batch_size) if exp.kind == "mean" else None
            value = {"correct": correct, "mean_z": mz}
            exp.parts.write(f"{name}.base", key, value)
        base[name] = float(value["correct"].mean())
        mean_z[name] = value["mean_z"]
        bar.update(1)
    bar.close()
    return base, mean_z


def _mark_low_base(task_rows: list[dict], base: dict[str, float], min_base: float) -> list[str]:
    """Fill in base accuracies, skip relations below ``min_base``; the relations that run."""
    for row in task_rows:
        if row["relation"] in base:
            row["base"] = base[row["relation"]]
            if base[row["relation"]] < min_base:
                row["status"] = f"skipped: base accuracy {base[row['relation']]:.2f} < {min_base}"
    return [r["relation"] for r in task_rows if r["status"] == "run"]


def _baselines(valid: list[str], rel_heads: dict[str, list[Head]], base: dict[str, float], shape: tuple[int, int],
               n_random: int, seed: int, **control_rules) -> tuple[dict, dict, list[dict]]:
    """The seeded baselines: random heads on each relation's prompts, and the control tasks on which the
    relation's heads are removed (with the table of controls)."""
    L, H = shape
    randoms = {name: random_heads(L, H, rel_heads[name], len(rel_heads[name]), n_random, seed, name) for name in valid}
    valid_heads = {name: rel_heads[name] for name in valid}
    controls = {name: select_controls(name, valid_heads, base, seed, **control_rules) for name in valid}
    control_rows = [{"relation": name, "control": c, "overlap": overlap(rel_heads[name], rel_heads[c]),
                     "base": base[name], "control_base": base[c]} for name in valid for c in controls[name]]
    return randoms, controls, control_rows


def _plan(valid, rel_heads, randoms, controls) -> dict[str, list[Curve]]:
    """Per task, its curves: the relation's own first, then its random samples, then every relation whose control
    this task is (that relation's heads on this task's prompts)."""
    plan = {t: [Curve("relation", t, "", rel_heads[t], None)] for t in valid}
    for t in valid:
        plan[t] += [Curve("random", t, str(i), hs, t) for i, hs in enumerate(randoms[t])]
    for name in valid:
        for c in controls[name]:
            plan[c].append(Curve("control", name, c, rel_heads[name], name))
    return plan


def _removed_at(acc: np.ndarray) -> int:
    """The table's step: the first step reaching accuracy 0, else all the heads."""
    zero = np.flatnonzero(acc[1:] == 0)
    return int(zero[0]) + 1 if zero.size else len(acc) - 1


def _run_plan(exp: _Experiment, tasks, plan, mean_z, baseline_steps):
    """Run every curve, task by task, in two phases: the relation curves (every step; they fix each relation's
    table step), then the baselines at ``baseline_steps`` steps plus their owner's table step. Each phase of a
    task is one cached part. Returns the accuracies by curve label, seconds per task, the tasks computed now and the
    share of decoder-block evaluations (per prompt, last token) that the parts computed now skipped by starting each
    step at its first ablated layer (None when every part came from the cache)."""
    accs, seconds, steps_at, fresh = {}, {}, {}, set()
    tally = {"skipped": 0, "blocks": 0}

    def phase_curves(t: str, phase: int) -> tuple[list[Curve], list[list[int]]]:
        curves = plan[t][:1] if phase == 0 else plan[t][1:]
        steps = [curve_steps(len(c.heads), None if phase == 0 else baseline_steps,
                             [steps_at[c.owner]] if phase == 1 else ()) for c in curves]
        return curves, steps

    def work(t: str, phase: int) -> int:  # prompt-steps: each ablation step runs the last token of every prompt once
        return tasks[t].n * sum(map(len, phase_curves(t, phase)[1]))

    bar = tqdm(total=sum(work(t, 0) for t in plan), desc=f"causal: {exp.kind} ablation", unit="prompt",
               unit_scale=True, disable=not exp.progress)
    for phase in (0, 1):
        if phase == 1:  # the baselines' steps are known now
            bar.total += sum(work(t, 1) for t in plan)
            bar.refresh()
        for t in plan:
            curves, steps = phase_curves(t, phase)
            if not curves:
                continue
            bar.set_postfix_str(t)
            value = _run_phase(exp, tasks[t], f"{t}.{('relation', 'baselines')[phase]}", curves, steps, mean_z[t],
                               bar)
            if value.pop("fresh"):
                fresh.add(t)
            else:
                bar.update(work(t, phase))
            seconds[t] = round(seconds.get(t, 0.0) + value["seconds"], 2)
            for k in tally:  # a part read from the cache ran no block
                tally[k] += value.get("blocks", {}).get(k, 0)
            for curve, acc in zip(curves, value["accs"], strict=True):
                accs[curve.label] = acc
                if phase == 0:
                    steps_at[t] = _removed_at(acc)
    bar.close()
    return accs, seconds, fresh, round(tally["skipped"] / tally["blocks"], 4) if tally["blocks"] else None


def _run_phase(exp: _Experiment, task: Task, part: str, curves: list[Curve], steps, replacement, bar) -> dict:
    """One task's curves of one phase, from the cache or computed (and stored)."""
    key = exp.key(task, curves=[c.heads for c in curves], steps=steps)
    value = exp.parts.read(part, key)
    if value is not None:
        return {**value, "fresh": False}
    s0, tally = time.perf_counter(), {}
    _, got = run_curves(exp.loaded, task, [c.heads for c in curves], replacement=replacement,
                        batch_size=exp.batch_size, bar=bar, steps=steps, tally=tally)
    value = {"accs": got, "seconds": time.perf_counter() - s0}
    exp.parts.write(part, key, value)
    return {**value, "blocks": tally, "fresh": True}


def _result(model: str, kind: str, task_rows, head_rows, control_rows, curve_rows, reused) -> AblationResult:
    """The experiment's tidy tables (columns fixed even when a table is empty)."""
    return AblationResult(
        model, kind, pd.DataFrame(task_rows),
        pd.DataFrame(head_rows, columns=["relation", "rank", "layer", "head", "score"]),
        pd.DataFrame(control_rows, columns=["relation", "control", "overlap", "base", "control_base"]),
        pd.DataFrame(curve_rows,
                     columns=["relation", "task", "curve", "sample", "step", "removed", "accuracy", "n_prompts"]),
        reused=reused)


def _curve_rows(plan: dict[str, list[Curve]], accs: dict, tasks: dict[str, Task]) -> list[dict]:
    """Tidy curve rows in the plan's order: relation, random samples, controls; steps not evaluated are left out."""
    rows = []
    for t, curves in plan.items():
        for c in curves:
            hs = c.heads
            rows += [{"relation": c.relation, "task": t, "curve": c.kind, "sample": c.sample, "step": s,
                      "removed": "" if s == 0 else f"{hs[s - 1][0]}.{hs[s - 1][1]}", "accuracy": float(a),
                      "n_prompts": tasks[t].n} for s, a in enumerate(accs[c.label]) if np.isfinite(a)]
    return rows
