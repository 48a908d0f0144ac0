"""Notebook 06's study of the static QK map, per relation: validation against real attention (the dynamic run's
prompts and the same prompts with a distractor entity) and the joint QK×OV prediction against the with-context
dynamic scores. Results go under ``<results_dir>/<model>/qk/`` (one resumable part per relation, tables with
manifests); the computations are in :mod:`maps_utils.qk.inference`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import relations as R
from ..core.errors import OptionError
from ..core.hashing import content_key
from ..core.manifest import build_manifest
from ..core.params import check_parameters
from ..core.store import RunOptions, Slots, write_table
from ..dynamic.capture import build_prompts, pad_batch
from ..dynamic.correlation import pearson
from ..dynamic.readouts import ReadoutStore
from ..dynamic.scores import DynamicScores, pad_id, relation_prompts
from ..static.ranks import scan_columns
from ..static.scores import TAU
from .circuit import QKMap, QKOptions
from .inference import distractor_prompts, real_attention, run_prompts, static_batch

VERSION = 4  # 2: attention on the source position; 3: average ranks for ties, logits in float32 at least; 4: oracle
PROMPT_SETS = ("relation", "distractor")
MEASURES = ("top1", "top1_no_first", "spearman", "static_on_source", "real_on_source")


@dataclass
class QKStudy:
    """The study's three tables and their manifest."""

    validation: pd.DataFrame  # relation, prompt_set, layer, head, relation_head, MEASURES (means over prompts), n
    joint: pd.DataFrame  # relation, template, layer, head, joint_score, oracle_score, dynamic_with, static_ov, k
    correlations: pd.DataFrame  # relation, r_ov, r_joint, r_oracle, n_points, ...
    manifest: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Mean agreement per prompt set, over all heads and over the heads that implement the prompt's relation
        (static score >= tau)."""
        v = self.validation
        rows = []
        for ps in PROMPT_SETS:
            part = v[v.prompt_set == ps]
            for group, sel in (("all heads", part), ("relation heads", part[part.relation_head])):
                rows.append({"prompt set": ps, "heads": group, "n (head, relation)": len(sel),
                             **{m: round(float(sel[m].mean()), 3) if len(sel) else float("nan") for m in MEASURES}})
        return pd.DataFrame(rows)


def _relation(loaded, qmap, rel, tr, run, max_pairs, ov_representation, columns, slots, identity, from_pass: list):
    tok = loaded.tokenizer
    pairs, src, tgt, per_template = relation_prompts(tok, tr, rel.templates, max_pairs, run.seed)
    if [tuple(p) for p in pairs] != [tuple(p) for p in rel.pairs] or tgt != list(rel.target_ids):
        raise OptionError(f"{rel.name}: the dynamic scores were computed on other pairs; pass the max_pairs and seed "
                          "of the dynamic run.")
    distract = distractor_prompts(tok, rel.templates[0], src)
    key = content_key({**identity, "prompts": [[p.ids for p in ps] for ps in per_template],
                       "distractor": [p.ids for p in distract], "targets": tgt, "k": rel.k})
    saved = slots.read(rel.name, key)
    if saved is not None:
        return saved
    common = dict(ov_representation=ov_representation, columns=columns, rank_cap=rel.k, pad=pad_id(tok),
                  batch_size=run.batch(64), memory_budget_mb=run.memory_budget_mb)
    stored = ReadoutStore(loaded, run).read(rel.name, per_template, common["batch_size"], common["pad"])
    rows = stored.attention if stored is not None and stored.has_attention() else [None] * len(per_template)
    if rows[0] is not None:
        from_pass.append(rel.name)
    per = [run_prompts(loaded, qmap, ps, tgt, **common, attention=a) for ps, a in zip(per_template, rows, strict=True)]
    value = {"relation": {m: torch.cat([p[m] for p in per]) for m in MEASURES},
             "distractor": run_prompts(loaded, qmap, distract, None, **common),
             "joint_rank": torch.stack([p["joint_rank"] for p in per]),  # [T, n, L, H]
             "oracle_rank": torch.stack([p["oracle_rank"] for p in per])}
    slots.write(rel.name, key, value)
    return value


def _validation_rows(name, value, ov_map) -> list[pd.DataFrame]:
    L, H = ov_map.shape
    frames = []
    for ps in PROMPT_SETS:
        got = value[ps]
        frames.append(pd.DataFrame({
            "relation": name, "prompt_set": ps, "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
            "relation_head": (ov_map >= TAU).flatten().numpy(),
            **{m: torch.nanmean(got[m], 0).flatten().numpy() for m in MEASURES}, "n": got["top1"].shape[0]}))
    return frames


def qk_study(loaded, dynamic: DynamicScores, static, *, options: QKOptions = QKOptions(),
             ov_representation: str | None = None, max_pairs: int | None = None,
             run: RunOptions = RunOptions()) -> QKStudy:
    """Validate the static QK map and test the joint prediction on every relation of ``dynamic`` that ``static``
    scored. ``max_pairs`` and ``run.seed`` must be the dynamic run's (its prompts are rebuilt);
    ``ov_representation`` defaults to the static scores' representation (the OV-only score the joint one is compared with).
    """
    t0 = time.perf_counter()
    if dynamic.kind != "single":
        raise OptionError(f"The QK study reads single-token dynamic scores (dynamic_scores), not {dynamic.kind}.")
    ov_representation = ov_representation or static.representation
    qmap = QKMap(loaded.weights, options)
    identity = {"version": VERSION, "model": loaded.name, "weights_sha256": loaded.weights_sha256,
                "dtype": str(loaded.dtype), "options": asdict(options), "ov_representation": ov_representation}
    out = run.folder(loaded.name, "qk")
    slots = Slots(out / "parts" if out is not None else None, enabled=run.use_cache)
    columns = scan_columns(loaded.weights)
    scored = {r.name for r in static.relations}
    todo = [rel for rel in dynamic.relations if rel.name in scored]
    if not todo:
        raise OptionError("No relation has both static and dynamic scores; score the same relations in both.")
    val, joint, corr, from_pass = [], [], [], []
    for rel in tqdm(todo, desc="QK map", unit="relation", disable=not run.progress):
        tr = R.filter_single_token(R.load(rel.name), loaded.tokenizer, leading_space=True, min_pairs=1)
        value = _relation(loaded, qmap, rel, tr, run, max_pairs, ov_representation, columns, slots, identity,
                          from_pass)
        ov_map = static.score_map(rel.name, rel.k)  # [L, H]
        val += _validation_rows(rel.name, value, ov_map)
        j = (value["joint_rank"] < rel.k).float().mean(1)  # [T, L, H]
        o = (value["oracle_rank"] < rel.k).float().mean(1)
        d = rel.scores(rel.k, "with")  # [T, L, H]
        L, H = ov_map.shape
        for t, template in enumerate(rel.templates):
            joint.append(pd.DataFrame({
                "relation": rel.name, "template": template, "layer": np.repeat(np.arange(L), H),
                "head": np.tile(np.arange(H), L), "joint_score": j[t].flatten().numpy(),
                "oracle_score": o[t].flatten().numpy(),
                "dynamic_with": d[t].flatten().numpy(), "static_ov": ov_map.flatten().numpy(), "k": rel.k}))
        r_ov, _ = pearson(ov_map.repeat(d.shape[0], 1, 1).flatten().numpy(), d.flatten().numpy())
        r_joint, _ = pearson(j.flatten().numpy(), d.flatten().numpy())
        r_oracle, _ = pearson(o.flatten().numpy(), d.flatten().numpy())
        corr.append({"relation": rel.name, "category": rel.category, "r_ov": r_ov, "r_joint": r_joint,
                     "r_joint − r_ov": r_joint - r_ov, "r_oracle": r_oracle, "n_points": d.numel(), "n_prompts": rel.n,
                     "max_joint": float(j.max()), "max_dynamic_with": float(d.max()), "k": rel.k})
    study = QKStudy(pd.concat(val, ignore_index=True), pd.concat(joint, ignore_index=True), pd.DataFrame(corr))
    study.manifest = build_manifest(parameters={**identity, "max_pairs": max_pairs, "run": run.manifest(),
                                                "static_variant": static.representation,
                                                "relations": [r.name for r in todo],
                                                "attention_from_the_dynamic_pass": from_pass},
                                    wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
    if out is not None:
        for name in ("validation", "joint", "correlations"):
            write_table(getattr(study, name), out / f"{name}.csv", study.manifest)
    return study


def attends_and_writes(study: QKStudy, static, *, min_share: float = 0.3, n_examples: int = 3) -> pd.DataFrame:
    """Heads that read as "attends to X, writes R(X)": they implement R (OV score >= tau) and their static QK map
    puts at least ``min_share`` of the last token's attention on the source X in R's prompts. With the real
    attention on X, the joint score (mean over templates) and examples: pairs ``X → R(X)`` whose target the head's
    OV map ranks in its top-k."""
    check_parameters(min_share=min_share)
    v = study.validation
    v = v[(v.prompt_set == "relation") & v.relation_head & (v.static_on_source >= min_share)]
    joint = study.joint.groupby(["relation", "layer", "head"]).joint_score.mean()
    rows = []
    for r in v.sort_values("static_on_source", ascending=False).itertuples():
        rel = static.relation(r.relation)
        top, _ = static.ranks_of(r.relation)
        hits = (top[r.layer, r.head].long() < rel.k()).nonzero().flatten()[:n_examples].tolist()
        rows.append({"layer": int(r.layer), "head": int(r.head), "relation": r.relation,
                     "ov_score": round(float(static.score_map(r.relation)[r.layer, r.head]), 3),
                     "static_on_source": round(r.static_on_source, 3), "real_on_source": round(r.real_on_source, 3),
                     "joint_score": round(float(joint[(r.relation, r.layer, r.head)]), 3),
                     "attends to X, writes R(X)": "; ".join(f"{rel.pairs[i][0]} → {rel.pairs[i][1]}" for i in hits)})
    return pd.DataFrame(rows, columns=["layer", "head", "relation", "ov_score", "static_on_source", "real_on_source",
                                       "joint_score", "attends to X, writes R(X)"])


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``"\\r"``, ``"\\n"``, ...): a bare carriage return in a CSV
    field that is not quoted would split its row on reading."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def salient_keys(loaded, options: QKOptions = QKOptions(), *, n_tokens: int = 10,
                 run: RunOptions = RunOptions()) -> pd.DataFrame:
    """Each head's ``n_tokens`` most attracting key tokens (QK saliency, :meth:`~maps_utils.qk.circuit.QKMap.attraction`):
    layer, head, rank, token_id, token (control characters escaped, :func:`printable`), attraction; written to
    ``<results_dir>/<model>/qk/salient_keys.csv`` (the atlas shows it)."""
    check_parameters(n_keys=n_tokens)
    t0 = time.perf_counter()
    sal = QKMap(loaded.weights, options).attraction(progress=run.progress)  # [L, H, V]
    values, ids = torch.topk(sal, n_tokens, dim=-1)
    L, H = sal.shape[:2]
    decode = loaded.tokenizer.decode
    table = pd.DataFrame({
        "layer": np.repeat(np.arange(L), H * n_tokens), "head": np.tile(np.repeat(np.arange(H), n_tokens), L),
        "rank": np.tile(np.arange(n_tokens), L * H), "token_id": ids.flatten().numpy(),
        "token": [printable(decode([int(i)])) for i in ids.flatten().tolist()],
        "attraction": values.flatten().numpy()})
    out = run.folder(loaded.name, "qk")
    if out is not None:
        manifest = build_manifest(parameters={"options": asdict(options), "n_tokens": n_tokens,
                                              "weights_sha256": loaded.weights_sha256},
                                  wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
        write_table(table, out / "salient_keys.csv", manifest)
    return table


def key_summary(keys: pd.DataFrame, layers=None, n: int = 5) -> pd.DataFrame:
    """One row per head (of ``layers``, default all): its ``n`` most attracting key tokens, best first."""
    k = keys[keys["rank"] < n]
    if layers is not None:
        k = k[k.layer.isin(list(layers))]
    return (k.sort_values(["layer", "head", "rank"]).groupby(["layer", "head"]).token
            .agg(lambda t: " | ".join(repr(x) for x in t)).rename(f"top {n} key tokens").reset_index())


@torch.inference_mode()
def key_profile(loaded, layer: int, head: int, relation: str, template: str, *, options: QKOptions = QKOptions(),
                max_pairs: int | None = 40, seed: int = 0) -> pd.DataFrame:
    """A head's key-preference profile for a relation's sources in one template: for each position of the prompt
    (the template's tokens, and ``<X>`` for the source), the mean share of the last token's attention there under
    the static QK map and in the real head, over the relation's prompts (all the same length when the sources are
    single tokens)."""

    tr = R.filter_single_token(R.load(relation), loaded.tokenizer, leading_space=True, min_pairs=1)
    _, src, _, _ = relation_prompts(loaded.tokenizer, tr, [template], max_pairs, seed)
    prompts = build_prompts(loaded.tokenizer, template, src)
    ids, last, source = pad_batch(prompts, pad_id(loaded.tokenizer), loaded.weights.device)
    s, _ = static_batch(QKMap(loaded.weights, options), ids, last, options.representation)
    static_share = torch.softmax(s[:, layer, head], -1).mean(0)  # [T]
    real_share = real_attention(loaded.model, loaded.weights, ids, last)[:, layer, head].mean(0)
    labels = [repr(loaded.tokenizer.decode([int(t)])) for t in ids[0]]
    labels[int(source[0])] = "<X>"
    return pd.DataFrame({"position": range(len(labels)), "token": labels,
                         "static share": static_share.float().cpu().numpy().round(3),
                         "real share": real_share.float().cpu().numpy().round(3)})


def query_keys(loaded, layer: int, head: int, template: str, *, options: QKOptions = QKOptions(),
               top: int = 10) -> pd.DataFrame:
    """The head's ``top`` key tokens over the whole vocabulary for the query that ends ``template`` (its last token
    after ``<X>``): the vocabulary-wide view of where that query looks, at ``options``' offsets."""
    suffix = template.split(R.PLACEHOLDER)[-1]
    ids = list(loaded.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if not ids:
        raise OptionError(f"Template {template!r} ends with {R.PLACEHOLDER}: there is no query token after it.")
    values, keys = QKMap(loaded.weights, options).salient_keys(layer, ids[-1:], top)
    decode = loaded.tokenizer.decode
    return pd.DataFrame({"query": repr(decode(ids[-1:])), "rank": range(top),
                         "key": [repr(decode([int(k)])) for k in keys[head, 0].tolist()],
                         "logit": values[head, 0].float().cpu().numpy().round(3)})
