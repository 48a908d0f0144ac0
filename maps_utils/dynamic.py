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
with the static engine's exact early-stopping scan (:func:`maps_utils.static.ranks_of_targets`, ties
in the target's favour), capped at ``rank_cap`` (default: the relation's k; a row whose target ranks near
the top must scan the whole vocabulary, so a larger cap costs time).

Prompts are padded on the right and every prompt keeps its own last and source positions (the
reference assumes one shared source position). The forward pass stops after the last layer's
attention, so no MLP of the last layer and no LM head is computed.

Static and dynamic scores are compared by Pearson r over heads × templates (the static map tiled once
per template, MAPS-SPEC §8.13).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import relations as R
from .hashing import content_key
from .heads import HeadWeights
from .io import atomic_write_text
from .manifest import build_manifest, write_manifest
from .models import LoadedModel
from .plots import model_slug
from .static import Columns, _inverse, ranks_of_targets, scan_permutation
from .store import Slots, check_results_dir

log = logging.getLogger(__name__)

ENGINE_VERSION = 2  # 2: keyed by the weights' hash
CONTEXTS = ("without", "with")
MULTI_TOKEN_MODES = {"paper": False, "natural": True}
"""Multi-token source tokenisation: ``paper`` tokenises the source without a leading space after a
prefix that keeps its trailing space (the reference, MAPS-SPEC §8.8); ``natural`` tokenises it with the
leading space it has in running text."""


# ---- prompts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """Token ids of one prompt and the position of its source's (last) token."""

    ids: tuple[int, ...]
    source: int

    @property
    def last(self) -> int:
        return len(self.ids) - 1


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text or special else []


def build_prompts(tokenizer, template: str, sources: Sequence[Sequence[int]], space_in_source: bool = True) -> list[Prompt]:
    """Prompts ``prefix + source tokens + suffix`` for a template with one ``<X>``.

    The source's token ids are used exactly as given (the ones the relation filter kept). With
    ``space_in_source`` the sources' tokens carry the leading space (" France"), so the template's space
    before ``<X>`` is dropped from the prefix; otherwise the prefix keeps it (the paper's multi-token
    prompts). The prefix is tokenised with the tokenizer's special tokens (BOS where it adds one).
    """
    if template.count(R.PLACEHOLDER) != 1:
        raise R.RelationError(f"Template {template!r} must contain {R.PLACEHOLDER} exactly once.")
    prefix, suffix = template.split(R.PLACEHOLDER)
    if space_in_source and prefix:
        if not prefix.endswith(" "):
            raise R.RelationError(
                f"Template {template!r}: the sources carry a leading space, so put a space before {R.PLACEHOLDER}.")
        prefix = prefix[:-1]
    head = _ids(tokenizer, prefix, special=True)
    tail = _ids(tokenizer, suffix, special=False)
    out = []
    for src in sources:
        src = [int(i) for i in src]
        if not src:
            raise R.RelationError(f"Template {template!r}: a source has no tokens.")
        out.append(Prompt(tuple(head + src + tail), len(head) + len(src) - 1))
    return out


def tokenization_agreement(tokenizer, template: str, sources: Sequence[str], prompts: Sequence[Prompt]) -> float:
    """Fraction of prompts whose ids equal the tokenisation of the filled-in string (a diagnostic:
    prompts are built from the filtered source tokens, which BPE merges across the boundary could change)."""
    same = [tuple(_ids(tokenizer, R.fill(template, s), special=True)) == p.ids
            for s, p in zip(sources, prompts, strict=True)]
    return float(np.mean(same)) if same else float("nan")


def pad_batch(prompts: Sequence[Prompt], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids`` and each prompt's ``last`` and ``source`` positions.

    Right padding needs no attention mask: under causal attention no real token sees the pads after it,
    and its position ids are those of the unpadded prompt. (Masking the pads instead can leave a pad's query
    row fully masked, e.g. under Gemma's sliding window, and the NaN it produces reaches real tokens as 0·NaN.)
    """
    T = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p.ids)] = torch.tensor(p.ids)
    last = torch.tensor([p.last for p in prompts])
    source = torch.tensor([p.source for p in prompts])
    return ids.to(device), last.to(device), source.to(device)


# ---- one forward pass: each head's z at the last position and its value at the source position --------
class _Stop(Exception):
    """Raised after the last layer's attention: nothing later is needed."""


@torch.inference_mode()
def capture(model, heads: HeadWeights, input_ids: Tensor, last: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``model`` once on right-padded ``input_ids`` (see :func:`pad_batch`); return ``z_last`` ``[B, L, n_heads, d_head]`` (every head's mixed value at each
    prompt's last position: its real, in-context output before W_O) and ``v_source`` ``[B, L, n_kv, d_head]``
    (the value vectors at each prompt's source position, bias included)."""
    L, B = heads.n_layers, input_ids.shape[0]
    rows = torch.arange(B, device=input_ids.device)
    z_last: list[Tensor | None] = [None] * L
    v_src: list[Tensor | None] = [None] * L
    handles = []

    def z_hook(layer):
        def hook(mod, args):
            z_last[layer] = heads.split_z(args[0][rows, last])
            if layer == L - 1:
                raise _Stop
        return hook

    def v_hook(layer):
        def hook(mod, args, out):
            v_src[layer] = heads.values_from_output(out[rows, source])
        return hook

    for layer in range(L):
        handles.append(heads.out_proj_module(layer).register_forward_pre_hook(z_hook(layer)))
        handles.append(heads.v_module(layer).register_forward_hook(v_hook(layer)))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack(z_last, 1), torch.stack(v_src, 1)


def head_writes(heads: HeadWeights, z_last: Tensor, v_source: Tensor) -> tuple[Tensor, Tensor]:
    """``(with_context, without_context)`` head writes ``[B, L, n_heads, d_model]`` (no b_O):
    ``z_h W_O[h]`` and ``v_source[g(h)] W_O[h]``."""
    groups = heads.kv_groups.to(v_source.device)
    w_o = torch.stack([heads.W_O(layer) for layer in range(heads.n_layers)]).to(z_last.dtype)  # [L, H, dh, d]
    with_ctx = torch.einsum("blhe,lhem->blhm", z_last, w_o)
    without = torch.einsum("blhe,lhem->blhm", v_source[:, :, groups], w_o)
    return with_ctx, without


def model_columns(heads: HeadWeights, dtype: torch.dtype | None = None) -> Columns:
    """The unembedding in the static engine's scan order (shared by every row)."""
    U = heads.U.to(dtype or heads.U.dtype)
    perm = scan_permutation(U.shape[1], U.device)
    return Columns(U[:, perm].contiguous(), perm, _inverse(perm))


@torch.inference_mode()
def prompt_ranks(
    model,
    heads: HeadWeights,
    prompts: Sequence[Prompt],
    targets: Sequence[int],
    *,
    batch_size: int = 64,
    rank_cap: int = 10,
    pad_id: int = 0,
    columns: Columns | None = None,
    memory_budget_mb: float = 512.0,
    progress: bool = True,
    desc: str = "prompts",
) -> Tensor:
    """Target ranks of every prompt's head writes: ``int16 [4, n, L, H]`` = (with-context top, with-context
    bottom, without-context top, without-context bottom); a rank equal to ``rank_cap`` means ">= cap"."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = heads.U.device
    columns = columns or model_columns(heads)
    L, H, n = heads.n_layers, heads.n_heads, len(prompts)
    out = torch.empty((4, n, L, H), dtype=torch.int16)
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, leave=False, disable=not progress or len(starts) < 2):
        batch = prompts[s : s + batch_size]
        B = len(batch)
        z, v = capture(model, heads, *pad_batch(batch, pad_id, device))
        with_ctx, without = head_writes(heads, z, v)
        rows = torch.cat([with_ctx, without]).reshape(-1, heads.d_model).to(columns.cols.dtype)
        tgt = torch.as_tensor(targets[s : s + batch_size], device=device)
        tgt = tgt[:, None].expand(B, L * H).reshape(-1).repeat(2)
        top, bottom = ranks_of_targets(rows, tgt, columns, rank_cap, memory_budget_mb)
        top, bottom = top.view(2, B, L, H), bottom.view(2, B, L, H)
        out[0, s : s + B], out[1, s : s + B] = top[0].cpu(), bottom[0].cpu()
        out[2, s : s + B], out[3, s : s + B] = top[1].cpu(), bottom[1].cpu()
    return out


# ---- whole relations: cached, resumable tables ---------------------------------------------------------
@dataclass
class DynamicRelation:
    """One relation's prompts (per template) and the ranks of their targets in every head."""

    name: str
    category: str | None
    copying: bool
    pairs: list[tuple[str, str]]
    target_ids: list[int]
    templates: list[str]
    ranks: Tensor  # int16 [n_templates, 4, n, L, H]
    agreement: list[float]  # per template: prompts equal to the filled-in string's tokenisation
    k: int  # the relation's k (the static score's)
    rank_cap: int  # ranks are exact below it
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.pairs)

    def scores(self, k: int | None = None, context: str = "without", suppression: bool = False) -> Tensor:
        """``[n_templates, L, H]`` fraction of prompts whose target is in the head's top-k (bottom-k with
        ``suppression``); k defaults to the relation's."""
        k = k or self.k
        if k > self.rank_cap:
            raise ValueError(f"{self.name}: k={k} exceeds the rank cap {self.rank_cap}; rerun the dynamic scores "
                             f"with rank_cap >= {k}.")
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


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _run(loaded: LoadedModel, kind: str, todo: list[tuple[R.Relation, R.TokenizedRelation]], templates: list[str],
         space_in_source: bool, *, k, k_copying, k_other, max_pairs, seed, batch_size, rank_cap, memory_budget_mb,
         results_dir, use_cache, progress, params: dict, skipped: dict) -> DynamicScores:
    t0 = time.perf_counter()
    heads, tok = loaded.heads, loaded.tokenizer
    identity = {"engine_version": ENGINE_VERSION, "model": loaded.name, "weights_sha256": loaded.weights_sha256,
                "architecture": heads.summary(), "dtype": str(loaded.dtype)}
    out = check_results_dir(results_dir) / model_slug(loaded.name) / "dynamic" / kind if results_dir else None
    parts = Slots(out / "parts" if out is not None else None, enabled=use_cache)
    table_key = content_key({**identity, "kind": kind, "templates": templates, "max_pairs": max_pairs, "seed": seed,
                             "k": k, "k_copying": k_copying, "k_other": k_other, "rank_cap": rank_cap, **params})
    columns = model_columns(heads)
    pad_id = _pad_id(tok)
    done, reused = [], []
    bar = tqdm(total=len(todo) * len(templates), desc=f"dynamic scores ({kind})", unit="template",
               disable=not progress)
    for rel, tr in todo:
        bar.set_postfix_str(rel.name)
        keep = _subsample(len(tr), max_pairs, seed)
        pairs = [tr.pairs[i] for i in keep]
        src = [tr.source_ids[i] if isinstance(tr.source_ids[i], list) else [tr.source_ids[i]] for i in keep]
        tgt = [tr.target_ids[i] for i in keep]
        kk = k or rel.k(k_copying, k_other)
        cap = max(rank_cap or kk, kk)
        per_template = [build_prompts(tok, t, src, space_in_source) for t in templates]
        key = content_key({**identity, "k": kk, "rank_cap": cap, "prompts": [[p.ids, p.source] for ps in per_template for p in ps],
                     "targets": tgt})
        saved = parts.read(rel.name, key)
        if saved is not None:
            done.append(DynamicRelation(**saved["relation"]))
            reused.append(rel.name)
            bar.update(len(templates))
            continue
        r0 = time.perf_counter()
        ranks = []
        for i, ps in enumerate(per_template):
            ranks.append(prompt_ranks(loaded.model, heads, ps, tgt, batch_size=batch_size, rank_cap=cap, pad_id=pad_id,
                                      columns=columns, memory_budget_mb=memory_budget_mb, progress=False,
                                      desc=f"{rel.name} · template {i + 1}/{len(templates)}"))
            bar.update(1)
        ranks = torch.stack(ranks)
        agreement = [tokenization_agreement(tok, t, [s for s, _ in pairs], ps) if space_in_source else float("nan")
                     for t, ps in zip(templates, per_template, strict=True)]
        result = DynamicRelation(rel.name, rel.category, rel.copying, pairs, tgt, list(templates), ranks, agreement,
                                 kk, cap, time.perf_counter() - r0)
        done.append(result)
        # one finished relation at a time: a rerun resumes from here
        parts.write(rel.name, key, {"table": table_key, "relation": result.__dict__})
    bar.close()
    scores = DynamicScores(loaded.name, kind, done, skipped, reused=reused)
    scores.manifest = build_manifest(
        parameters={**identity, **params, "templates": templates, "max_pairs": max_pairs, "seed": seed,
                    "batch_size": batch_size, "k": k, "k_copying": k_copying, "k_other": k_other,
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


def _stored(parts: Slots, table_key: str, first: list[DynamicRelation]) -> list[DynamicRelation]:
    """Every stored relation computed with this run's weights and settings: ``first`` in its order, then the others
    by name (what ``scores.csv`` holds, so a query for a few relations never drops what an earlier run added)."""
    found = {name: saved["value"]["relation"] for name, saved in parts.entries()
             if isinstance(saved.get("value"), dict) and saved["value"].get("table") == table_key}
    names = {r.name for r in first}
    return list(first) + [DynamicRelation(**found[n]) for n in sorted(set(found) - names)]


def write_table(table: pd.DataFrame, path: str | Path, manifest: dict) -> Path:
    """Write a result table as CSV with its manifest beside it (``<name>.manifest.json``), both atomically."""
    path = Path(path)
    atomic_write_text(path, table.to_csv(index=False))
    write_manifest(path.with_suffix(".manifest.json"), manifest)
    return path


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
    k_copying: int = 1,
    k_other: int = 10,
    max_pairs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    rank_cap: int | None = None,
    min_pairs: int = R.MIN_PAIRS,
    memory_budget_mb: float = 512.0,
    results_dir: str | Path | None = "results",
    use_cache: bool = True,
    progress: bool = True,
) -> DynamicScores:
    """Single-token dynamic scores (MAPS-SPEC §1.4) of every usable relation, with and without context.

    Args:
        relations: names, paths or :class:`~maps_utils.relations.Relation` objects (default: all shipped).
        templates: generic templates with one ``<X>`` (default: the paper's four, ``templates.json``).
        k, k_copying, k_other: the top-k of the test: ``k`` for every relation, else ``k_copying`` for the
            copying relations and ``k_other`` for the rest (the paper: 1 and 10; Llama-3.x: 3 and 25).
        max_pairs: cap on pairs per relation (a seeded random subset) for quick runs; None: all.
        batch_size: prompts per forward pass.
        rank_cap: ranks are exact below it, so tables for any k <= cap come from one run (default: the
            relation's k, the cheapest: a row whose target ranks near the top must scan the whole vocabulary).
        results_dir: per-relation parts (resume), ``scores.csv`` and its manifest go under
            ``<results_dir>/<model>/dynamic/single/`` (None: no files).
    """
    templates = list(templates or R.read_templates()["dynamic"])
    todo, skipped = _usable(_relations(relations), lambda rel: R.filter_single_token(
        rel, loaded.tokenizer, leading_space=True, min_pairs=min_pairs))
    if not todo:
        raise R.RelationError(f"No relation has {min_pairs} usable single-token pairs for {loaded.name}; "
                              "pass other relations or lower min_pairs.")
    return _run(loaded, "single", todo, templates, True, k=k, k_copying=k_copying, k_other=k_other,
                max_pairs=max_pairs, seed=seed, batch_size=batch_size, rank_cap=rank_cap,
                memory_budget_mb=memory_budget_mb, results_dir=results_dir, use_cache=use_cache, progress=progress,
                params={"min_pairs": min_pairs, "leading_space": True}, skipped=skipped)


def multi_token_scores(
    loaded: LoadedModel,
    relations: Sequence[str | R.Relation] | None = None,
    template: str | None = None,
    *,
    mode: str = "paper",
    k: int | None = None,
    k_copying: int = 1,
    k_other: int = 10,
    max_pairs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    rank_cap: int | None = None,
    min_pairs: int = R.MIN_PAIRS,
    memory_budget_mb: float = 512.0,
    results_dir: str | Path | None = "results",
    use_cache: bool = True,
    progress: bool = True,
) -> DynamicScores:
    """Dynamic scores with multi-token sources (MAPS-SPEC §1.6), read at the source's last token.

    Default relations: the paper's 11 multi-token relations (``multi_token`` in ``relations.json``);
    default template ``"This is a document about <X>"``. ``mode`` is ``paper`` or ``natural``
    (:data:`MULTI_TOKEN_MODES`). Files go under ``<results_dir>/<model>/dynamic/multi_token_<mode>/``.
    """
    if mode not in MULTI_TOKEN_MODES:
        raise ValueError(f"Unknown multi-token mode '{mode}'; use one of {', '.join(MULTI_TOKEN_MODES)}.")
    space = MULTI_TOKEN_MODES[mode]
    template = template or R.read_templates()["multi_token"]
    todo, skipped = _usable(_relations(relations, default_filter=lambda r: r.multi_token), lambda rel: R.filter_multi_token(
        rel, loaded.tokenizer, min_pairs=min_pairs, leading_space=space))
    if not todo:
        raise R.RelationError(f"No relation has {min_pairs} usable multi-token pairs for {loaded.name} in mode "
                              f"'{mode}'; pass other relations, another mode or lower min_pairs.")
    return _run(loaded, f"multi_token_{mode}", todo, [template], space, k=k, k_copying=k_copying, k_other=k_other,
                max_pairs=max_pairs, seed=seed,
                batch_size=batch_size, rank_cap=rank_cap, memory_budget_mb=memory_budget_mb, results_dir=results_dir,
                use_cache=use_cache, progress=progress, params={"min_pairs": min_pairs, "mode": mode}, skipped=skipped)


# ---- correlation with the static scores --------------------------------------------------------------
def pearson(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (t distribution with n − 2 degrees of freedom, as scipy's).

    Returns ``(nan, nan)`` when either vector is constant or there are fewer than 3 points.
    """
    from scipy.special import stdtr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two vectors of one length, got {x.shape} and {y.shape}")
    n = x.size
    if n < 3:
        return float("nan"), float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = math.sqrt((dx * dx).sum()), math.sqrt((dy * dy).sum())
    if sx == 0 or sy == 0:
        return float("nan"), float("nan")
    r = float(np.clip((dx * dy).sum() / (sx * sy), -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return r, float(2 * stdtr(n - 2, -abs(t)))


def correlations(static, dynamic: DynamicScores, k: int | None = None) -> pd.DataFrame:
    """Per relation, score type (relation / suppression) and context: Pearson r and p between static and
    dynamic scores over heads × templates (the static ``[L, H]`` map tiled once per template), both at the
    relation's k (or ``k``).

    ``static`` is a :class:`~maps_utils.scores.StaticScores`; relations without a static score are left out.
    Columns: relation, category, score_type, context, r, p, n_points, max_static, max_dynamic, n_prompts, k.
    """
    rows = []
    static_names = {r.name for r in static.relations}
    for rel in dynamic.relations:
        if rel.name not in static_names:
            continue
        kk = k or rel.k
        for score_type, supp in (("relation", False), ("suppression", True)):
            s_map = static.score_map(rel.name, kk, suppression=supp).flatten()
            for context in CONTEXTS:
                d = rel.scores(kk, context, suppression=supp)  # [T, L, H]
                xs = s_map.repeat(d.shape[0]).numpy()
                r, p = pearson(xs, d.flatten().numpy())
                rows.append({"relation": rel.name, "category": rel.category, "score_type": score_type,
                             "context": context, "r": r, "p": p, "n_points": xs.size,
                             "max_static": float(s_map.max()), "max_dynamic": float(d.max()),
                             "n_prompts": rel.n, "k": kk})
    return pd.DataFrame(rows)


def paper_style(corr: pd.DataFrame, score_type: str = "relation") -> pd.DataFrame:
    """The paper's table layout: one row per relation, ``r w/o / r w/ (max static)``."""
    g = corr[corr.score_type == score_type]
    rows = []
    for rel, sub in g.groupby("relation", sort=False):
        by = sub.set_index("context")
        rows.append({"relation": rel, "category": sub.category.iloc[0],
                     "r w/o context": by.loc["without", "r"], "r w/ context": by.loc["with", "r"],
                     "max static": by.loc["without", "max_static"],
                     "cell": f"{by.loc['without', 'r']:.2f} / {by.loc['with', 'r']:.2f} "
                             f"({by.loc['without', 'max_static']:.2f})"})
    return pd.DataFrame(rows)


def summary(corr: pd.DataFrame) -> pd.DataFrame:
    """Mean / min / max of r over relations, per score type and context (the paper's summary row);
    relations whose r is undefined (a constant score vector) are counted separately."""
    rows = []
    for (score_type, context), g in corr.groupby(["score_type", "context"], sort=False):
        r = g.r.dropna()
        rows.append({"score_type": score_type, "context": context, "relations": len(r),
                     "undefined": int(g.r.isna().sum()), "mean r": r.mean(), "min r": r.min(), "max r": r.max()})
    return pd.DataFrame(rows)
