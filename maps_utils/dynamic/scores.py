"""Dynamic (inference-time) relation scores, and how well the static scores predict them (MAPS-SPEC §1.4, §1.6).

For a relation R and a template such as ``"No <X> means no"``, every usable source is put in the
template and the model is run once. For every head h at the prompt's **last position**:

* **with context**: the head's real write ``z_h · W_O[h]`` (no b_O), projected with U (no final norm,
  no bias), as the reference does;
* **without context**: what the head would write had its attention at the last position been put
  entirely on the source token, everything else as in the clean run. That write is the source
  position's value vector (of the head's KV group, bias included) through ``W_O[h]``, so it is read
  from the same clean forward pass; a test proves the equivalence against an explicit attention
  override.

The dynamic score is the fraction of prompts whose target is in the top-k of the projection (the
static score's k), and the suppression score the same on the negated projection. Ranks are computed
with the static engine's exact early-stopping scan (:func:`maps_utils.static.ranks.ranks_of_targets`, ties
in the target's favour), capped at ``rank_cap`` (default: the relation's k; a row whose target ranks near
the top must scan the whole vocabulary, so a larger cap costs time).

Prompts are padded on the right and every prompt keeps its own last and source positions (the
reference assumes one shared source position). The forward pass stops after the last layer's
attention, so no MLP of the last layer and no LM head is computed.

Static and dynamic scores are compared in :mod:`maps_utils.dynamic.correlation`; the prompts and the forward pass are in
:mod:`maps_utils.dynamic.capture`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import relations as R
from ..core.deprecation import renamed_arguments, renamed_attribute
from ..core.hashing import content_key
from ..core.manifest import build_manifest, call_arguments
from ..core.params import check_parameters
from ..core.store import RunOptions, Slots, write_table
from ..models.loading import LoadedModel
from .capture import READOUTS, build_prompts, model_columns, prompt_ranks, tokenization_agreement
from .readouts import PromptSetReadouts, ReadoutStore

log = logging.getLogger(__name__)

ENGINE_VERSION = 2  # 2: keyed by the weights' hash
_STORED_AS = {"tokenization_agreement": "agreement"}  # DynamicRelation's fields under their names in the slots
_FIELD_OF = {stored: name for name, stored in _STORED_AS.items()}
DEFAULT_BATCH = 64  # prompts per forward pass (64 beat 128 on the 2-core CPU in a full run)
CONTEXTS = ("without", "with")
MULTI_TOKEN_MODES = {"paper": False, "natural": True}
"""Multi-token source tokenisation: ``paper`` tokenises the source without a leading space after a
prefix that keeps its trailing space (the reference, MAPS-SPEC §8.8); ``natural`` tokenises it with the
leading space it has in running text."""


# ---- whole relations: cached, resumable tables ---------------------------------------------------------
@renamed_arguments(agreement="tokenization_agreement")
@dataclass
class DynamicRelation:
    """One relation's prompts (per template) and the ranks of their targets in every head. Stored in its slot by
    :meth:`stored` (read back by :meth:`from_stored`), under the field names of engine version 2."""

    name: str
    category: str | None
    copying: bool
    pairs: list[tuple[str, str]]
    target_ids: list[int]
    templates: list[str]
    ranks: Tensor  # int16 [n_templates, 4, n, L, H]
    tokenization_agreement: list[float]  # per template: share of prompts equal to the filled-in string's tokenisation
    k: int  # the relation's k (the static score's)
    rank_cap: int  # ranks are exact below it
    seconds: float = 0.0

    agreement = renamed_attribute("agreement", "tokenization_agreement")

    def stored(self) -> dict:
        """The fields as the slot keeps them (``tokenization_agreement`` as ``agreement``, its name in every slot
        written so far, in the same place), so a slot's bytes do not change with the field's name."""
        return {_STORED_AS.get(name, name): value for name, value in self.__dict__.items()}

    @classmethod
    def from_stored(cls, fields: dict) -> DynamicRelation:
        """A relation from its slot's fields (:meth:`stored`)."""
        return cls(**{_FIELD_OF.get(name, name): value for name, value in fields.items()})

    @property
    def n(self) -> int:
        return len(self.pairs)

    def scores(self, k: int | None = None, context: str = "without", suppression: bool = False) -> Tensor:
        """``[n_templates, L, H]`` fraction of prompts whose target is in the head's top-k (bottom-k with
        ``suppression``); k defaults to the relation's."""
        k = k or self.k
        check_parameters(k=k, rank_cap=self.rank_cap)
        if context not in CONTEXTS:
            raise ValueError(f"Unknown context '{context}'; use one of {', '.join(CONTEXTS)}.")
        idx = (2 if context == "without" else 0) + (1 if suppression else 0)
        return (self.ranks[:, idx] < k).float().mean(1)


@dataclass
class DynamicScores:
    """Dynamic scores of several relations (``kind``: ``single`` or ``multi_token``)."""

    model: str
    kind: str
    relations: list[DynamicRelation]
    skipped: dict[str, int] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # relations read from the cache

    def relation(self, name: str) -> DynamicRelation:
        for rel in self.relations:
            if rel.name == name:
                return rel
        raise KeyError(f"relation '{name}' has no dynamic scores; scored: {', '.join(r.name for r in self.relations)}")

    def table(self, k: int | None = None) -> pd.DataFrame:
        """Tidy: model, relation, category, template, context, layer, head, score, suppression_score, k, n_prompts
        (k: each relation's own unless given)."""
        frames = []
        for rel in self.relations:
            kk = k or rel.k
            L, H = rel.ranks.shape[3], rel.ranks.shape[4]
            for context in CONTEXTS:
                sc, sup = rel.scores(kk, context), rel.scores(kk, context, suppression=True)
                for t, template in enumerate(rel.templates):
                    frames.append(pd.DataFrame({
                        "model": self.model, "relation": rel.name, "category": rel.category, "template": template,
                        "context": context, "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                        "score": sc[t].flatten().numpy(), "suppression_score": sup[t].flatten().numpy(),
                        "k": kk, "n_prompts": rel.n,
                    }))
        return pd.concat(frames, ignore_index=True)


def _subsample(n: int, max_pairs: int | None, seed: int) -> list[int]:
    if max_pairs is None or n <= max_pairs:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=max_pairs, replace=False).tolist())


def relation_prompts(tokenizer, tr: R.TokenizedRelation, templates: Sequence[str], max_pairs: int | None, seed: int,
                     space_in_source: bool = True):
    """The prompts a dynamic run builds for one relation: ``(pairs, source ids, target ids, prompts per template)``
    of the pair subset that ``max_pairs`` and ``seed`` choose."""
    keep = _subsample(len(tr), max_pairs, seed)
    pairs = [tr.pairs[i] for i in keep]
    src = [tr.source_ids[i] if isinstance(tr.source_ids[i], list) else [tr.source_ids[i]] for i in keep]
    tgt = [tr.target_ids[i] for i in keep]
    return pairs, src, tgt, [build_prompts(tokenizer, t, src, space_in_source) for t in templates]


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _run(loaded: LoadedModel, kind: str, todo: list[tuple[R.Relation, R.TokenizedRelation]], templates: list[str],
         space_in_source: bool, *, k, top_k, max_pairs, rank_cap, run: RunOptions, params: dict,
         skipped: dict, arguments: dict, readouts: bool = False) -> DynamicScores:
    """Score ``todo`` (each relation from the store when its key matches), then write the union table."""
    t0 = time.perf_counter()
    identity = {"engine_version": ENGINE_VERSION, "model": loaded.name, "weights_sha256": loaded.weights_sha256,
                "architecture": loaded.weights.summary(), "dtype": str(loaded.dtype)}
    out = run.folder(loaded.name, "dynamic", kind)
    parts = Slots(out / "parts" if out is not None else None, enabled=run.use_cache)
    table_key = content_key({**identity, "kind": kind, "templates": templates, "max_pairs": max_pairs,
                             "seed": run.seed, "k": k, "k_copying": top_k.copying, "k_other": top_k.other,
                             "rank_cap": rank_cap, **params})
    step = _Step(loaded, identity, templates, space_in_source, parts, table_key, max_pairs, rank_cap, run,
                 ReadoutStore(loaded, run) if readouts and out is not None else None)
    done, reused = [], []
    bar = tqdm(total=len(todo) * len(templates), desc=f"dynamic scores ({kind})", unit="template",
               disable=not run.progress)
    for rel, tr in todo:
        bar.set_postfix_str(rel.name)
        result, from_store = step.relation(rel, tr, k or rel.k(top_k), bar)
        done.append(result)
        if from_store:
            reused.append(rel.name)
    bar.close()
    scores = DynamicScores(loaded.name, kind, done, skipped, reused=reused)
    scores.manifest = build_manifest(
        parameters={**arguments, **identity, **params, "templates": templates, "top_k": asdict(top_k),
                    "batch_size": step.batch_size,
                    "rank_cap": rank_cap, "rank_caps": {r.name: r.rank_cap for r in done},
                    "relations": {r.name: r.n for r in done}, "skipped": skipped,
                    "reused_from_cache": reused, "seconds_per_relation": {r.name: round(r.seconds, 2) for r in done}},
        wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
    if out is not None:
        with parts.lock():
            union = DynamicScores(loaded.name, kind, _stored(parts, table_key, done), skipped)
            manifest = {**scores.manifest, "parameters": {**scores.manifest["parameters"],
                                                          "table_relations": [r.name for r in union.relations]}}
            write_table(union.table(), out / "scores.csv", manifest)
    return scores


class _Step:
    """What scoring one relation needs from its run: the model, the cache slots and their keys, the options."""

    def __init__(self, loaded: LoadedModel, identity: dict, templates: list[str], space_in_source: bool,
                 parts: Slots, table_key: str, max_pairs: int | None, rank_cap: int | None, run: RunOptions,
                 readouts: ReadoutStore | None = None):
        self.loaded, self.identity, self.templates, self.space_in_source = loaded, identity, templates, space_in_source
        self.readouts = readouts
        self.parts, self.table_key, self.max_pairs, self.rank_cap, self.run = parts, table_key, max_pairs, rank_cap, run
        self.batch_size = run.batch(DEFAULT_BATCH)
        self.columns = model_columns(loaded.weights)
        self.pad_id = pad_id(loaded.tokenizer)

    def relation(self, rel: R.Relation, tr: R.TokenizedRelation, k: int, bar) -> tuple[DynamicRelation, bool]:
        """One relation's ranks under every template (from the store when its key matches; else computed and
        stored, so a rerun resumes after the last finished relation); True when it came from the store."""
        tok, templates = self.loaded.tokenizer, self.templates
        pairs, src, tgt, per_template = relation_prompts(tok, tr, templates, self.max_pairs, self.run.seed,
                                                         self.space_in_source)
        cap = max(self.rank_cap or k, k)
        key = content_key({**self.identity, "k": k, "rank_cap": cap,
                           "prompts": [[p.ids, p.source] for ps in per_template for p in ps], "targets": tgt})
        saved = self.parts.read(rel.name, key)
        if saved is not None:
            bar.update(len(templates))
            return DynamicRelation.from_stored(saved["relation"]), True
        r0 = time.perf_counter()
        ranks = []
        read = [{name: [] for name in READOUTS} if self.readouts is not None else None for _ in per_template]
        for i, ps in enumerate(per_template):
            ranks.append(prompt_ranks(self.loaded.model, self.loaded.weights, ps, tgt, batch_size=self.batch_size,
                                      rank_cap=cap, pad_id=self.pad_id, columns=self.columns,
                                      memory_budget_mb=self.run.memory_budget_mb, progress=False,
                                      desc=f"{rel.name} · template {i + 1}/{len(templates)}", readouts=read[i]))
            bar.update(1)
        if self.readouts is not None:  # the pass's source inputs and attention rows, for fidelity and the QK study
            self.readouts.write(rel.name, per_template, self.pad_id, PromptSetReadouts(
                self.batch_size, [r["source_inputs"] for r in read], [r["attention"] for r in read]))
        agreements = [tokenization_agreement(tok, t, [s for s, _ in pairs], ps) if self.space_in_source
                      else float("nan") for t, ps in zip(templates, per_template, strict=True)]
        result = DynamicRelation(rel.name, rel.category, rel.copying, pairs, tgt, list(templates),
                                 torch.stack(ranks), agreements, k, cap, time.perf_counter() - r0)
        self.parts.write(rel.name, key, {"table": self.table_key, "relation": result.stored()})
        return result, False


def _stored(parts: Slots, table_key: str, first: list[DynamicRelation]) -> list[DynamicRelation]:
    """Every stored relation computed with this run's weights and settings: ``first`` in its order, then the others
    by name (what ``scores.csv`` holds, so a query for a few relations never drops what an earlier run added)."""
    found = {name: saved["value"]["relation"] for name, saved in parts.entries()
             if isinstance(saved.get("value"), dict) and saved["value"].get("table") == table_key}
    names = {r.name for r in first}
    return list(first) + [DynamicRelation.from_stored(found[n]) for n in sorted(set(found) - names)]


def _relations(relations, default_filter=None) -> list[R.Relation]:
    names = R.list_relations() if relations is None else relations
    rels = [R.load(r) if isinstance(r, (str, Path)) else r for r in names]
    return [r for r in rels if default_filter is None or relations is not None or default_filter(r)]


def _usable(relations: list[R.Relation], tokenize) -> tuple[list, dict[str, int]]:
    """``(relation, tokenized)`` pairs that pass ``tokenize``'s filter, and the others' usable-pair counts."""
    todo, skipped = [], {}
    for rel in relations:
        tr = tokenize(rel)
        if tr.usable:
            todo.append((rel, tr))
        else:
            skipped[rel.name] = len(tr)
            log.warning("relation %s skipped: %d usable pairs (too few)", rel.name, len(tr))
    return todo, skipped


def dynamic_scores(
    loaded: LoadedModel,
    relations: Sequence[str | R.Relation] | None = None,
    templates: Sequence[str] | None = None,
    *,
    k: int | None = None,
    top_k: R.TopK | None = None,
    max_pairs: int | None = None,
    rank_cap: int | None = None,
    min_pairs: int = R.MIN_PAIRS,
    run: RunOptions = RunOptions(),
    readouts: bool = True,
) -> DynamicScores:
    """Single-token dynamic scores (MAPS-SPEC §1.4) of every usable relation, with and without context.

    Args:
        relations: names, paths or :class:`~maps_utils.relations.Relation` objects (default: all shipped).
        templates: generic templates with one ``<X>`` (default: the paper's four, ``templates.json``).
        k, top_k: the top-k of the test: ``k`` for every relation, else each relation's k from ``top_k``
            (default :class:`~maps_utils.relations.TopK`: the paper's 1 for copying relations and 10 for the rest;
            ``relations.LLAMA3_TOP_K``: 3 and 25).
        max_pairs: cap on pairs per relation (a subset seeded by ``run.seed``) for quick runs; None: all.
        rank_cap: ranks are exact below it, so tables for any k <= cap come from one run (default: the
            relation's k, the cheapest: a row whose target ranks near the top must scan the whole vocabulary).
        run: per-relation parts (resume), ``scores.csv`` and its manifest go under
            ``<results_dir>/<model>/dynamic/single/`` (None: no files); ``run.batch_size`` prompts per forward
            pass (default 64); seed, cache use, progress and memory budget (:class:`~maps_utils.core.store.RunOptions`).
        readouts: also keep what the same forward passes read for the fidelity profile and the QK study (the
            real source vectors and the attention rows, :mod:`maps_utils.dynamic.readouts`) under
            ``<results_dir>/<model>/dynamic/readouts/``, so those steps run no pass of their own (speed only).
    """
    arguments = call_arguments(locals())
    check_parameters(k=k, max_pairs=max_pairs, rank_cap=rank_cap, min_pairs=min_pairs)
    templates = list(templates or R.read_templates()["dynamic"])
    todo, skipped = _usable(_relations(relations), lambda rel: R.filter_single_token(
        rel, loaded.tokenizer, leading_space=True, min_pairs=min_pairs))
    if not todo:
        raise R.RelationError(f"No relation has {min_pairs} usable single-token pairs for {loaded.name}; "
                              "pass other relations or lower min_pairs.")
    return _run(loaded, "single", todo, templates, True, k=k, top_k=top_k or R.TopK(), max_pairs=max_pairs,
                rank_cap=rank_cap, run=run, params={"min_pairs": min_pairs, "leading_space": True}, skipped=skipped,
                arguments=arguments, readouts=readouts)


def multi_token_scores(
    loaded: LoadedModel,
    relations: Sequence[str | R.Relation] | None = None,
    template: str | None = None,
    *,
    mode: str = "paper",
    k: int | None = None,
    top_k: R.TopK | None = None,
    max_pairs: int | None = None,
    rank_cap: int | None = None,
    min_pairs: int = R.MIN_PAIRS,
    run: RunOptions = RunOptions(),
) -> DynamicScores:
    """Dynamic scores with multi-token sources (MAPS-SPEC §1.6), read at the source's last token.

    Default relations: the paper's 11 multi-token relations (``multi_token`` in ``relations.json``);
    default template ``"This is a document about <X>"``. ``mode`` is ``paper`` or ``natural``
    (:data:`MULTI_TOKEN_MODES`). Files go under ``<results_dir>/<model>/dynamic/multi_token_<mode>/``.
    """
    arguments = call_arguments(locals())
    check_parameters(k=k, max_pairs=max_pairs, rank_cap=rank_cap, min_pairs=min_pairs)
    if mode not in MULTI_TOKEN_MODES:
        raise ValueError(f"Unknown multi-token mode '{mode}'; use one of {', '.join(MULTI_TOKEN_MODES)}.")
    leading_space = MULTI_TOKEN_MODES[mode]
    template = template or R.read_templates()["multi_token"]
    todo, skipped = _usable(_relations(relations, default_filter=lambda r: r.multi_token), lambda rel: R.filter_multi_token(
        rel, loaded.tokenizer, min_pairs=min_pairs, leading_space=leading_space))
    if not todo:
        raise R.RelationError(f"No relation has {min_pairs} usable multi-token pairs for {loaded.name} in mode "
                              f"'{mode}'; pass other relations, another mode or lower min_pairs.")
    return _run(loaded, f"multi_token_{mode}", todo, [template], leading_space, k=k, top_k=top_k or R.TopK(),
                max_pairs=max_pairs, rank_cap=rank_cap, run=run, params={"min_pairs": min_pairs, "mode": mode},
                skipped=skipped, arguments=arguments)
