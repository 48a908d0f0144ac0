"""Static relation scores as tidy tables: computed once per (model, representation, relations), cached and resumable.

``static_scores(loaded)`` scores every usable relation in every head and returns a
:class:`StaticScores`; its ``table()`` is the tidy result (one row per relation × layer × head) at any
k up to the rank cap. Ranks are stored one slot per relation under ``results/<model>/static/<representation>/ranks/``
(:class:`~maps_utils.core.store.Slots`), keyed by the weights' hash, the representation, the rank cap, the filter and
the relation's pairs: a query reads every relation already stored and computes only the others, and ``scores.csv``
holds every relation stored for these weights, so a smaller query never shrinks it. An interrupted run resumes
from its last finished layer.

A smaller rank cap than :data:`RANK_CAP` (a study that needs the scores at k <= 10 only, such as notebook 02's grid
of representations) keeps its slots in ``ranks-cap<N>/`` and reads any relation the default cap stored, its ranks
clamped to the smaller cap: ranks below the cap are exact either way, so they are the same numbers. A small cap lets
more rows stop scanning early (1.8-2.2x faster on both embedded models under ``raw``).

The tables, cache keys and manifests spell the representation ``variant`` (its name before 0.2), so results stored
before the rename are read as they are and new ones are byte for byte the same.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .. import relations as R
from ..core.deprecation import renamed_arguments, renamed_attribute, renamed_function
from ..core.hashing import content_key
from ..core.io import StorageError, atomic_write_text
from ..core.manifest import build_manifest, call_arguments, check_file, read_manifest, write_manifest
from ..core.params import check_parameters
from ..core.store import RunOptions, Slots, check_results_dir
from ..models.loading import LoadedModel
from . import sources
from .ranks import RankResult, target_ranks

log = logging.getLogger(__name__)

ENGINE_VERSION = 2  # 2: one slot per relation, keyed by content (the weights' hash included)
PARTIAL = "partial"  # the slot of an unfinished run's finished layers
RANK_CAP = 100  # ranks are exact below it: scores for every k <= RANK_CAP come from one run
TAU = 0.15  # the paper's threshold for "head implements relation"
CHECKPOINT_SECONDS = 30.0  # how often an unfinished run saves its finished layers


@dataclass
class ScoredRelation:
    """One relation's usable pairs and where its rows sit in the concatenated rank tensors."""

    name: str
    category: str | None
    display_name: str | None
    copying: bool
    pairs: list[tuple[str, str]]
    source_ids: list[int]
    target_ids: list[int]
    start: int = 0

    @property
    def n(self) -> int:
        return len(self.pairs)

    def k(self, top_k: R.TopK | None = None) -> int:
        return (top_k or R.TopK()).of(self)


@dataclass
class StaticScores:
    """Target ranks of every usable relation in every head, and the tables derived from them."""

    model: str
    representation: str  # the sources' representation (:mod:`maps_utils.static.sources`)
    rank_cap: int
    relations: list[ScoredRelation]
    ranks: RankResult
    kv_groups: list[int]
    skipped: dict[str, int] = field(default_factory=dict)  # relation -> usable pairs (< min_pairs)
    manifest: dict = field(default_factory=dict)
    from_cache: bool = False

    variant = renamed_attribute("variant", "representation")

    def relation(self, name: str) -> ScoredRelation:
        for rel in self.relations:
            if rel.name == name:
                return rel
        raise KeyError(f"relation '{name}' was not scored; scored: {', '.join(r.name for r in self.relations)}")

    def ranks_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(top, bottom)`` ranks ``[L, H, n]`` of one relation's pairs."""
        rel = self.relation(name)
        sl = slice(rel.start, rel.start + rel.n)
        return self.ranks.top[..., sl], self.ranks.bottom[..., sl]

    def score_map(self, name: str, k: int | None = None, suppression: bool = False,
                  top_k: R.TopK | None = None) -> torch.Tensor:
        """``[L, H]`` relation (or suppression) scores of one relation."""
        rel = self.relation(name)
        k = k or rel.k(top_k)
        check_parameters(k=k, rank_cap=self.rank_cap)
        top, bottom = self.ranks_of(name)
        return ((bottom if suppression else top) < k).float().mean(-1)

    def table(self, k: int | None = None, top_k: R.TopK | None = None) -> pd.DataFrame:
        """Tidy scores: model, relation, category, layer, head, kv_group, score, suppression_score, k, n_pairs, variant
        (the column ``variant`` holds the representation, under the name stored tables have always used).

        ``k`` overrides every relation's k; otherwise each relation's k comes from ``top_k`` (default
        :class:`~maps_utils.relations.TopK`, the paper's 1 for copying relations and 10 for the others).
        """
        L, H = self.ranks.top.shape[:2]
        layer = torch.arange(L).repeat_interleave(H).tolist()
        head = torch.arange(H).repeat(L).tolist()
        frames = []
        for rel in self.relations:
            kk = k or rel.k(top_k)
            frames.append(pd.DataFrame({
                "model": self.model, "relation": rel.name, "category": rel.category, "layer": layer, "head": head,
                "kv_group": [self.kv_groups[h] for h in head],
                "score": self.score_map(rel.name, kk).flatten().numpy(),
                "suppression_score": self.score_map(rel.name, kk, suppression=True).flatten().numpy(),
                "k": kk, "n_pairs": rel.n, "variant": self.representation,
            }))
        return pd.concat(frames, ignore_index=True)


def _usable(relations, tokenizer, leading_space: bool, min_pairs: int):
    scored, skipped, start = [], {}, 0
    for rel in relations:
        rel = R.load(rel) if isinstance(rel, (str, Path)) else rel
        tok = R.filter_single_token(rel, tokenizer, leading_space=leading_space, min_pairs=min_pairs)
        if not tok.usable:
            skipped[rel.name] = len(tok)
            log.warning("relation %s skipped: %d usable single-token pairs (fewer than %d)", rel.name, len(tok),
                        min_pairs)
            continue
        scored.append(ScoredRelation(rel.name, rel.category, rel.display_name, rel.copying, tok.pairs,
                                     list(tok.source_ids), list(tok.target_ids), start))
        start += len(tok)
    return scored, skipped


def _identity(loaded: LoadedModel, representation: str, rank_cap, leading_space, min_pairs) -> dict:
    """What the ranks of every relation depend on besides its own pairs (the weights' hash included; the
    context-free pass's prefix for the representations that run one). An unknown representation is one sentence.
    The representation's key is ``variant``, as in every cache key stored before the rename."""
    rep = sources.parse(representation)
    identity = {"engine_version": ENGINE_VERSION, "weights_sha256": loaded.weights_sha256,
                "architecture": loaded.weights.summary(), "dtype": str(loaded.dtype), "variant": rep.name,
                "rank_cap": rank_cap, "leading_space": leading_space, "min_pairs": min_pairs}
    if not rep.parameters_only:
        identity["source_prefix"] = list(sources.default_prefix(loaded.weights))
    return identity


def _relation_key(identity_key: str, rel: ScoredRelation) -> str:
    return content_key([identity_key, rel.name, rel.pairs, rel.source_ids, rel.target_ids])


def _slot_value(rel: ScoredRelation, identity_key: str, top: torch.Tensor, bottom: torch.Tensor) -> dict:
    meta = {f: getattr(rel, f) for f in ("name", "category", "display_name", "copying", "pairs", "source_ids",
                                         "target_ids")}
    return {"identity": identity_key, "relation": meta, "top": top.clone(), "bottom": bottom.clone()}


def _assemble(scored: list[ScoredRelation], values: dict[str, dict], L: int, H: int, rank_cap: int,
              representation: str):
    """One :class:`RankResult` with every relation's ranks at its ``start`` (the order of ``scored``)."""
    n = sum(r.n for r in scored)
    ranks = RankResult(torch.full((L, H, n), rank_cap, dtype=torch.int16),
                       torch.full((L, H, n), rank_cap, dtype=torch.int16), representation, rank_cap)
    for rel in scored:
        v = values[rel.name]
        ranks.top[..., rel.start:rel.start + rel.n] = v["top"]
        ranks.bottom[..., rel.start:rel.start + rel.n] = v["bottom"]
    return ranks


def _compute(loaded, todo: list[ScoredRelation], slots: Slots, key: str, *, representation, rank_cap, compute_space,
             memory_budget_mb, progress) -> RankResult:
    """Ranks of ``todo``'s pairs (concatenated), resuming from and checkpointing to the folder's ``partial`` slot
    (stored under ``key``, which names exactly these relations and inputs)."""
    weights = loaded.weights
    src = [i for r in todo for i in r.source_ids]
    tgt = [i for r in todo for i in r.target_ids]
    L, H = weights.n_layers, weights.n_heads
    ranks = RankResult(torch.full((L, H, len(src)), rank_cap, dtype=torch.int16),
                       torch.full((L, H, len(src)), rank_cap, dtype=torch.int16), representation, rank_cap)
    saved = slots.read(PARTIAL, key) or {}
    done: list[int] = list(saved.get("done", []))
    if done:  # resume an interrupted run
        ranks.top, ranks.bottom = saved["top"], saved["bottom"]
    last_save = [time.perf_counter()]

    def checkpoint(layer: int, res: RankResult) -> None:
        done.append(layer)
        if time.perf_counter() - last_save[0] >= CHECKPOINT_SECONDS:
            slots.write(PARTIAL, key, {"top": res.top, "bottom": res.bottom, "done": list(done)})
            last_save[0] = time.perf_counter()

    todo_layers = [layer for layer in range(L) if layer not in done]
    try:
        target_ranks(weights, src, tgt, representation=representation, rank_cap=rank_cap, compute_space=compute_space,
                     memory_budget_mb=memory_budget_mb, layers=todo_layers, progress=progress, out=ranks,
                     on_layer=checkpoint)
    except KeyboardInterrupt:  # Ctrl-C: keep the finished layers, so the next run resumes from them
        if done:
            slots.write(PARTIAL, key, {"top": ranks.top, "bottom": ranks.bottom, "done": list(done)})
        raise
    return ranks


def ranks_folder(rank_cap: int) -> str:
    """Where a representation's slots of this rank cap go: ``ranks`` for :data:`RANK_CAP`, else ``ranks-cap<N>``."""
    return "ranks" if rank_cap == RANK_CAP else f"ranks-cap{rank_cap}"


@dataclass
class _Deeper:
    """The default cap's slots of the same representation, read by a query with a smaller cap (ranks clamped)."""

    slots: Slots
    identity_key: str
    rank_cap: int  # the smaller cap, of the query

    def clamped(self, value: dict, identity_key: str) -> dict:
        return {**value, "identity": identity_key, "top": value["top"].clamp(max=self.rank_cap),
                "bottom": value["bottom"].clamp(max=self.rank_cap)}

    def read(self, rel: ScoredRelation, identity_key: str) -> dict | None:
        value = self.slots.read(rel.name, _relation_key(self.identity_key, rel))
        return None if value is None else self.clamped(value, identity_key)


def _deeper(loaded, out: Path | None, identity: dict, run: RunOptions) -> _Deeper | None:
    if out is None or identity["rank_cap"] >= RANK_CAP:
        return None
    key = content_key({**identity, "rank_cap": RANK_CAP})
    return _Deeper(Slots(out / ranks_folder(RANK_CAP), enabled=run.use_cache), key, identity["rank_cap"])


def _found(slots: Slots, identity_key: str) -> dict[str, dict]:
    return {name: saved["value"] for name, saved in slots.entries()
            if name != PARTIAL and isinstance(saved.get("value"), dict) and saved["value"].get("identity") == identity_key}


def _stored(slots: Slots, identity_key: str, first: list[ScoredRelation],
            deeper: _Deeper | None = None) -> list[tuple[ScoredRelation, dict]]:
    """Every stored relation computed under ``identity_key`` (and, for a smaller cap, every one the default cap
    stored, clamped): ``first``'s relations in their order, then the others by name (what ``scores.csv`` holds: all a
    run and the runs before it computed for these weights)."""
    found = {}
    if deeper is not None:
        found = {name: deeper.clamped(v, identity_key) for name, v in _found(deeper.slots, deeper.identity_key).items()}
    found |= _found(slots, identity_key)
    order = [r.name for r in first if r.name in found] + sorted(set(found) - {r.name for r in first})
    out, start = [], 0
    for name in order:
        meta = found[name]["relation"]
        rel = ScoredRelation(**meta, start=start)
        out.append((rel, found[name]))
        start += rel.n
    return out


def _write_table(out: Path, slots: Slots, loaded, identity_key: str, scored, kv_groups, representation, rank_cap,
                 manifest: dict, deeper: _Deeper | None = None) -> None:
    """``scores.csv`` and ``manifest.json``: every relation stored for these weights (the union of runs)."""
    stored = _stored(slots, identity_key, scored, deeper)
    rels = [r for r, _ in stored]
    L, H = loaded.weights.n_layers, loaded.weights.n_heads
    ranks = _assemble(rels, {r.name: v for r, v in stored}, L, H, rank_cap, representation)
    union = StaticScores(loaded.name, representation, rank_cap, rels, ranks, kv_groups)
    table_manifest = {**manifest, "parameters": {**manifest["parameters"], "table_relations": [r.name for r in rels]}}
    atomic_write_text(out / "scores.csv", union.table().to_csv(index=False))
    write_manifest(out / "manifest.json", table_manifest, files=[out / "scores.csv"])
    with contextlib.suppress(FileNotFoundError):
        (out / "ranks.pt").unlink()  # the single-slot layout of earlier versions


def _needs_table(out: Path) -> bool:
    """Whether ``scores.csv`` and its manifest must be (re)written from the slots: missing, unreadable, or no longer
    what the manifest recorded (cut off or edited; said in one line)."""
    table, manifest = out / "scores.csv", out / "manifest.json"
    if not table.is_file():
        return True
    record = read_manifest(manifest)  # None, with a notice, when it is cut off or not JSON
    if record is None or table.name not in (record.get("files") or {}):
        if record is not None or not manifest.is_file():
            log.warning("%s has no record of scores.csv; rewriting both from the stored ranks", manifest)
        return True
    why = check_file(table)
    if why is not None:
        log.warning("%s was cut off or changed after it was written (%s); rebuilding it from the stored ranks",
                    table, why)
    return why is not None


@renamed_arguments(variant="representation")
def static_scores(
    loaded: LoadedModel,
    relations: Sequence[str | R.Relation] | None = None,
    *,
    representation: str | None = None,
    rank_cap: int = RANK_CAP,
    leading_space: bool = True,
    min_pairs: int = R.MIN_PAIRS,
    compute_space: str = "auto",
    run: RunOptions = RunOptions(),
) -> StaticScores:
    """Score every usable relation in every head of ``loaded`` (cached; see the module docstring).

    Args:
        relations: names, paths or :class:`~maps_utils.relations.Relation` objects (default: all shipped).
        representation: source representation (default: the model's registered one, ``loaded.representation``;
            the paper's is ``first_mlp``).
        rank_cap: ranks are exact below it, so scores for every k <= rank_cap come from one run.
        leading_space, min_pairs: the single-token filter (paper: True, 30).
        compute_space: ``auto``, ``head`` or ``model`` (speed only; results are identical).
        run: where per-relation ranks, ``scores.csv`` and the manifest go (``results_dir``; None: no files),
            cache use, progress bars and the rank engine's memory budget (:class:`~maps_utils.core.store.RunOptions`).
    """
    arguments = call_arguments(locals(), recorded_as={"representation": "variant"})  # the manifest's name of 0.1
    check_parameters(rank_cap=rank_cap, min_pairs=min_pairs)
    t0 = time.perf_counter()
    representation = representation or loaded.representation
    identity = _identity(loaded, representation, rank_cap, leading_space, min_pairs)  # checks the representation first
    relations = R.list_relations() if relations is None else relations
    scored, skipped = _usable(relations, loaded.tokenizer, leading_space, min_pairs)
    if not scored:
        raise R.RelationError(f"No relation has {min_pairs} usable single-token pairs for {loaded.name}.")
    identity_key = content_key(identity)
    keys = {r.name: _relation_key(identity_key, r) for r in scored}
    out = run.folder(loaded.name, "static", representation, writable=False)  # stored results read from a read-only folder
    slots = Slots(out / ranks_folder(rank_cap) if out is not None else None, enabled=run.use_cache)
    values = {r.name: v for r in scored if (v := slots.read(r.name, keys[r.name])) is not None}
    deeper = _deeper(loaded, out, identity, run)  # a smaller cap reads the default cap's ranks, clamped
    if deeper is not None:
        values |= {r.name: v for r in scored if r.name not in values and (v := deeper.read(r, identity_key)) is not None}
    todo = [r for r in scored if r.name not in values]
    if todo and out is not None:
        check_results_dir(run.results_dir, writable=True)  # before the work, not after it
    if todo:
        values.update(_compute_values(loaded, todo, slots, identity_key, keys, representation, rank_cap, compute_space,
                                      run))
    L, H = loaded.weights.n_layers, loaded.weights.n_heads
    result = StaticScores(loaded.name, representation, rank_cap, scored,
                          _assemble(scored, values, L, H, rank_cap, representation),
                          loaded.weights.kv_groups.tolist(), skipped, from_cache=not todo)
    params = {**arguments, **identity, "key": content_key(keys), "relations": keys, "skipped_relations": skipped,
              "computed": [r.name for r in todo]}
    result.manifest = build_manifest(parameters=params, wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
    if out is not None and todo:
        _store(out, slots, todo, keys, values, loaded, identity_key, scored, result, deeper)
    elif out is not None and _needs_table(out):
        try:
            _store(out, slots, [], keys, values, loaded, identity_key, scored, result, deeper)
        except StorageError as err:  # the scores returned are whole; only the table beside them could not be mended
            log.warning("scores.csv could not be rebuilt: %s", err)
    return result


def _store(out, slots, todo, keys, values, loaded, identity_key, scored, result, deeper=None) -> None:
    """Write the new relations' slots, then ``scores.csv`` and its manifest (the union of stored relations)."""
    with slots.lock():
        for rel in todo:
            slots.write(rel.name, keys[rel.name], values[rel.name])
        slots.remove(PARTIAL)
        _write_table(out, slots, loaded, identity_key, scored, result.kv_groups, result.representation, result.rank_cap,
                     result.manifest, deeper)


def _compute_values(loaded, todo: list[ScoredRelation], slots: Slots, identity_key: str, keys: dict[str, str],
                    representation: str, rank_cap: int, compute_space: str, run: RunOptions) -> dict[str, dict]:
    """The slot values of the relations not found in the store (their pairs ranked together in one pass)."""
    ranks = _compute(loaded, todo, slots, content_key([keys[r.name] for r in todo]), representation=representation,
                     rank_cap=rank_cap, compute_space=compute_space, memory_budget_mb=run.memory_budget_mb,
                     progress=run.progress)
    values, at = {}, 0
    for rel in todo:
        sl = slice(at, at + rel.n)
        values[rel.name] = _slot_value(rel, identity_key, ranks.top[..., sl], ranks.bottom[..., sl])
        at += rel.n
    return values


_ONLY_CRITERION = object()


def cap_for(k: int | None = None, top_k: R.TopK | None = None) -> int:
    """The smallest rank cap that gives the scores at ``k`` (else at every relation's k under ``top_k``, the paper's
    1 and 10 by default): what a study that reads nothing past its k asks for (speed only; see the module docstring)."""
    top_k = top_k or R.TopK()
    return k if k is not None else max(top_k.copying, top_k.other)


def choose_representation(
    loaded: LoadedModel,
    candidates: Sequence[str] = ("first_mlp", "raw"),
    relations: Sequence[str] = ("copying", "name_copying"),
    scoring_relations=_ONLY_CRITERION,
    **kwargs,
) -> tuple[str, pd.DataFrame]:
    """The static-only criterion for a model's source representation: the one under which the best head
    recovers the copying relations best (max over heads of the mean of the copying relations' scores
    at the paper's k = 1).

    ``scoring_relations`` are the relations actually scored (default: only ``relations``; None: every
    shipped relation, which shares its cache with a full :func:`static_scores` run); ``kwargs`` go to
    :func:`static_scores`. A candidate other than the model's registered representation is ranked only to the paper's
    k (:func:`cap_for`; the scores at k are the same) unless ``rank_cap`` is given. Returns the chosen representation
    and a table of the criterion per candidate.
    """
    scoring = list(relations) if scoring_relations is _ONLY_CRITERION else scoring_relations
    rows = []
    for representation in candidates:
        # the registered representation at the full cap (notebook 01's tables); the others to the paper's k only
        cap = {} if "rank_cap" in kwargs or representation == loaded.representation else {"rank_cap": cap_for()}
        res = static_scores(loaded, scoring, representation=representation, **cap, **kwargs)
        present = [r.name for r in res.relations if r.name in relations]
        if not present:
            raise R.RelationError(f"The representation criterion needs one of {', '.join(relations)} among the "
                                  "scored relations.")
        maps = torch.stack([res.score_map(name) for name in present]).mean(0)
        rows.append({"representation": representation, "best_head_copying": round(maps.max().item(), 4),
                     "heads_over_tau": int((maps >= TAU).sum()), "paper_choice": representation == "first_mlp"})
    table = pd.DataFrame(rows).set_index("representation")
    return str(table["best_head_copying"].idxmax()), table


choose_variant = renamed_function(choose_representation, "choose_variant")
