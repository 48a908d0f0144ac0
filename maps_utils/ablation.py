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
token per chunk (the embedded models' causal prompts have one length per relation: one chunk up to ``batch_size``).
Prompts are tokenised with the tokenizer's own special tokens (a BOS where it adds one), as in the dynamic scores.
Every random choice comes from ``seed`` and the relation's name, so a rerun gives identical tables. Results are
cached per task (``results/<model>/ablation/<kind>/parts/``): an interrupted run resumes at the next task.

This module chooses the heads and runs the experiment; the prompts and forward passes are in
:mod:`maps_utils.ablation_hooks`, the result tables and the paper's layout in :mod:`maps_utils.ablation_result`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import relations as R
from .ablation_hooks import Head, Task, build_task, curve_steps, mean_last_z, run_curves, seeded_rng
from .ablation_result import AblationResult
from .hashing import content_key
from .manifest import build_manifest
from .models import LoadedModel
from .plots import model_slug
from .store import Slots, check_results_dir

log = logging.getLogger(__name__)

ENGINE_VERSION = 2  # 2: keyed by the weights' hash
KINDS = ("zero", "mean")
PAPER_RELATIONS = ("copying", "name_copying", "word_first_letter", "word_last_letter", "year_following",
                   "country_capital", "country_language", "object_superclass", "product_company",
                   "adj_comparative", "verb_past_tense", "noun_pronoun", "english_spanish")
"""The 13 relations the paper ran the causal experiment on (MAPS-SPEC §2.2); our other relations have causal
templates of our own."""



# ---- choosing heads ------------------------------------------------------------------------------------
def max_relation_heads(n_heads_total: int) -> int:
    """The paper's cap on relation heads by model size: < 300 heads → 30, < 500 → 50, < 1000 → 100,
    < 1500 → 150, otherwise 250."""
    for limit, cap in ((300, 30), (500, 50), (1000, 100), (1500, 150)):
        if n_heads_total < limit:
            return cap
    return 250


def relation_heads(score_map: Tensor | np.ndarray, m: int | None = None) -> list[Head]:
    """The top-``m`` heads of a ``[L, H]`` static score map that score > 0, best first (a stable sort over the
    flattened layer × head order, so ties keep the lower layer/head first); ``m`` defaults to the cap."""
    s = torch.as_tensor(np.asarray(score_map), dtype=torch.float64)
    L, H = s.shape
    m = max_relation_heads(L * H) if m is None else m
    flat = s.flatten()
    order = torch.argsort(-flat, stable=True)
    order = order[flat[order] > 0][:m]
    return [(int(i) // H, int(i) % H) for i in order]


def random_heads(n_layers: int, n_heads: int, exclude: Sequence[Head], count: int, n_samples: int, seed: int,
                 name: str) -> list[list[Head]]:
    """``n_samples`` random orders of ``count`` heads drawn without replacement from the heads not in ``exclude``
    (fewer when fewer are left), seeded by ``seed`` and ``name``."""
    banned = set(map(tuple, exclude))
    pool = [(layer, h) for layer in range(n_layers) for h in range(n_heads) if (layer, h) not in banned]
    rng = seeded_rng(seed, name, 0)
    size = min(count, len(pool))
    return [[pool[i] for i in rng.choice(len(pool), size=size, replace=False)] for _ in range(n_samples)]


def overlap(main: Sequence[Head], other: Sequence[Head]) -> float:
    """|main ∩ other| / |main| (0 when ``main`` is empty)."""
    main_set = set(map(tuple, main))
    return len(main_set & set(map(tuple, other))) / len(main_set) if main_set else 0.0


def select_controls(main: str, heads: dict[str, Sequence[Head]], base: dict[str, float], seed: int, *,
                    max_overlap: float = 0.15, max_base_gap: float = 0.2, max_controls: int = 5) -> list[str]:
    """Control tasks for ``main``: the other relations of ``heads`` (the valid setups) in a seeded random order,
    kept while their relation heads overlap ``main``'s by less than ``max_overlap`` and their base accuracy is
    within ``max_base_gap`` of ``main``'s, up to ``max_controls``."""
    candidates = sorted(r for r in heads if r != main)
    order = [candidates[i] for i in seeded_rng(seed, main, 1).permutation(len(candidates))]
    chosen = []
    for other in order:
        if len(chosen) == max_controls:
            break
        if overlap(heads[main], heads[other]) < max_overlap and abs(base[other] - base[main]) <= max_base_gap + 1e-12:
            chosen.append(other)
    return chosen


# ---- the experiment ------------------------------------------------------------------------------------
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
    seed: int = 0,
    max_heads: int | None = None,
    max_overlap: float = 0.15,
    max_base_gap: float = 0.2,
    max_controls: int = 5,
    min_base: float = 0.1,
    max_pairs: int | None = None,
    min_pairs: int = R.MIN_PAIRS,
    k_copying: int = 1,
    k_other: int = 10,
    batch_size: int = 512,
    baseline_steps: int | None = None,
    results_dir: str | Path | None = "results",
    use_cache: bool = True,
    progress: bool = True,
) -> AblationResult:
    """Run the causal experiment (module docstring; MAPS-SPEC §1.5) on ``loaded``.

    Args:
        static: the model's :class:`~maps_utils.scores.StaticScores`; relation heads come from its score maps at
            each relation's k (``k_copying`` / ``k_other``, the paper's 1 / 10).
        relations: ``"paper"`` (the paper's 13 causal relations, default), ``"all"`` (every relation with a
            causal template), or names / :class:`~maps_utils.relations.Relation` objects. Control tasks are drawn
            from the same set.
        kind: ``zero`` (the paper's) or ``mean`` (each head's mean z at the last position over the prompts being
            evaluated: the relation's own, or the control task's).
        max_heads: cap on relation heads (default: :func:`max_relation_heads` of the model's head count).
        max_pairs: a seeded random subset of pairs per relation, for quick runs (None: all, the paper's).
        batch_size: prompts per forward pass.
        baseline_steps: evaluate the random-head and control-task curves at this many evenly spread steps, plus
            the table's step (the relation's #heads removed), instead of at every step (None, the paper's figure).
            The relation curves always run every step, so the table is the same either way; only the baselines'
            lines in the curves figure get coarser (8 steps: about a third of the baselines' forward passes at a 30-head cap).
        results_dir: per-task parts (resume) and the tables go under ``<results_dir>/<model>/ablation/<kind>/``.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown ablation kind '{kind}'; use one of {', '.join(KINDS)}.")
    if n_random < 0 or max_controls < 0:
        raise ValueError("n_random and max_controls must be >= 0.")
    if batch_size < 1 or (max_heads is not None and max_heads < 1):
        raise ValueError("batch_size and max_heads must be positive integers (max_heads=None: the paper's cap).")
    if baseline_steps is not None and (isinstance(baseline_steps, bool) or int(baseline_steps) != baseline_steps
                                       or baseline_steps < 1):
        raise ValueError("baseline_steps must be a positive integer (None: every step).")
    if static.model != loaded.name:
        raise ValueError(f"The static scores are {static.model}'s, not {loaded.name}'s; score this model first "
                         "(maps_utils.scores.static_scores(loaded)).")
    t0 = time.perf_counter()
    heads = loaded.heads
    L, H = heads.n_layers, heads.n_heads
    cap = max_heads if max_heads is not None else max_relation_heads(L * H)
    identity = {"engine_version": ENGINE_VERSION, "model": loaded.name, "weights_sha256": loaded.weights_sha256,
                "architecture": heads.summary(), "dtype": str(loaded.dtype), "device": str(loaded.device),
                "batch_size": batch_size}
    out = check_results_dir(results_dir) / model_slug(loaded.name) / "ablation" / kind if results_dir else None
    parts = Slots(out / "parts" if out is not None else None, enabled=use_cache, weights_only=False)
    static_names = {r.name for r in static.relations}

    # 1. tasks, relation heads and base accuracies
    tasks: dict[str, Task] = {}
    rel_heads: dict[str, list[Head]] = {}
    head_rows, task_rows, reused = [], [], []
    base: dict[str, float] = {}
    mean_z: dict[str, Tensor] = {}
    rels = _relation_list(relations)
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
        smap = static.score_map(rel.name, k_copying=k_copying, k_other=k_other)
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

    bar = tqdm(total=len(tasks), desc="causal: base accuracy", unit="relation", disable=not progress)
    for name, task in tasks.items():
        bar.set_postfix_str(name)
        key = content_key({**identity, "kind": kind, "prompts": task.prompts, "targets": task.targets})
        value = parts.read(f"{name}.base", key)
        if value is None:
            correct, _ = run_curves(loaded, task, [], batch_size=batch_size)
            value = {"correct": correct, "mean_z": mean_last_z(loaded, task, batch_size) if kind == "mean" else None}
            parts.write(f"{name}.base", key, value)
        base[name] = float(value["correct"].mean())
        mean_z[name] = value["mean_z"]
        bar.update(1)
    bar.close()
    for row in task_rows:
        if row["relation"] in base:
            row["base"] = base[row["relation"]]
            if base[row["relation"]] < min_base:
                row["status"] = f"skipped: base accuracy {base[row['relation']]:.2f} < {min_base}"
    valid = [r["relation"] for r in task_rows if r["status"] == "run"]

    # 2. baselines: random heads and control tasks (seeded)
    randoms = {name: random_heads(L, H, rel_heads[name], len(rel_heads[name]), n_random, seed, name) for name in valid}
    valid_heads = {name: rel_heads[name] for name in valid}
    controls = {name: select_controls(name, valid_heads, base, seed, max_overlap=max_overlap,
                                      max_base_gap=max_base_gap, max_controls=max_controls) for name in valid}
    control_rows = [{"relation": name, "control": c, "overlap": overlap(rel_heads[name], rel_heads[c]),
                     "base": base[name], "control_base": base[c]} for name in valid for c in controls[name]]

    # 3. relation curves (each on its own prompts): they fix the table's step, #heads removed
    def removed_at(acc: np.ndarray) -> int:  # first step reaching accuracy 0, else all the heads
        zero = np.flatnonzero(acc[1:] == 0)
        return int(zero[0]) + 1 if zero.size else len(acc) - 1

    # 4. baselines, task by task: random heads on the relation's prompts, and every relation whose control this
    # task is (its heads on this task's prompts), at ``baseline_steps`` steps plus that relation's table step
    plan = {t: [("relation", t, "", rel_heads[t], None)] for t in valid}
    for t in valid:
        plan[t] += [("random", t, str(i), hs, t) for i, hs in enumerate(randoms[t])]
    for name in valid:
        for c in controls[name]:
            plan[c].append(("control", name, c, rel_heads[name], name))

    def curve_plan(t: str, phase: int) -> tuple[list, list]:  # the phase's curves on task t, and their steps
        curves = plan[t][:1] if phase == 0 else plan[t][1:]
        steps = [curve_steps(len(hs), None if phase == 0 else baseline_steps,
                             [steps_at[owner]] if phase == 1 else ()) for *_, hs, owner in curves]
        return curves, steps

    def work(t: str, phase: int) -> int:  # prompt-steps: each ablation step runs the last token of every prompt once
        return tasks[t].n * sum(map(len, curve_plan(t, phase)[1]))

    curve_rows, seconds, accs, steps_at, fresh = [], {}, {}, {}, set()
    bar = tqdm(total=sum(work(t, 0) for t in plan), desc=f"causal: {kind} ablation", unit="prompt",
               unit_scale=True, disable=not progress)
    for phase in (0, 1):
        if phase == 1:  # the baselines' steps are known now
            bar.total += sum(work(t, 1) for t in plan)
            bar.refresh()
        for t in plan:
            curves, steps = curve_plan(t, phase)
            if not curves:
                continue
            bar.set_postfix_str(t)
            task = tasks[t]
            key = content_key({**identity, "kind": kind, "prompts": task.prompts, "targets": task.targets,
                         "curves": [hs for *_, hs, _ in curves], "steps": steps})
            part = f"{t}.{('relation', 'baselines')[phase]}"
            value = parts.read(part, key)
            if value is None:
                s0 = time.perf_counter()
                _, got = run_curves(loaded, task, [hs for *_, hs, _ in curves], replacement=mean_z[t],
                                    batch_size=batch_size, bar=bar, steps=steps)
                value = {"accs": got, "seconds": time.perf_counter() - s0}
                fresh.add(t)
                parts.write(part, key, value)
            else:
                bar.update(work(t, phase))
            seconds[t] = round(seconds.get(t, 0.0) + value["seconds"], 2)
            for curve, acc in zip(curves, value["accs"], strict=True):
                accs[curve[:3]] = acc
                if phase == 0:
                    steps_at[t] = removed_at(acc)
    bar.close()
    reused += [t for t in plan if t not in fresh]
    for t, curves in plan.items():  # tidy rows in the plan's order: relation, random samples, controls
        task = tasks[t]
        for ctype, rel, sample, hs, _ in curves:
            acc = accs[ctype, rel, sample]
            curve_rows += [{"relation": rel, "task": t, "curve": ctype, "sample": sample, "step": s,
                            "removed": "" if s == 0 else f"{hs[s - 1][0]}.{hs[s - 1][1]}", "accuracy": float(a),
                            "n_prompts": task.n} for s, a in enumerate(acc) if np.isfinite(a)]

    result = AblationResult(
        loaded.name, kind, pd.DataFrame(task_rows), pd.DataFrame(head_rows, columns=["relation", "rank", "layer", "head", "score"]),
        pd.DataFrame(control_rows, columns=["relation", "control", "overlap", "base", "control_base"]),
        pd.DataFrame(curve_rows, columns=["relation", "task", "curve", "sample", "step", "removed", "accuracy", "n_prompts"]),
        reused=reused)
    result.manifest = build_manifest(
        parameters={**identity, "kind": kind, "relations": [r.name for r in rels], "n_random": n_random, "seed": seed,
                    "max_heads": cap, "max_overlap": max_overlap, "max_base_gap": max_base_gap,
                    "max_controls": max_controls, "min_base": min_base, "max_pairs": max_pairs, "min_pairs": min_pairs,
                    "k_copying": k_copying, "k_other": k_other, "static_variant": static.variant,
                    "static_key": static.manifest.get("parameters", {}).get("key"),
                    "baseline_steps": baseline_steps, "controls": controls, "seconds_per_task": seconds,
                    "reused_from_cache": reused},
        wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
    if out is not None:
        with parts.lock():  # concurrent runs write whole table sets in turn, never a mix of two experiments
            result.write(results_dir)
    return result
