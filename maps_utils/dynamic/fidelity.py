"""How closely each source representation resembles what heads really read: the fidelity profile (issue 19).

At inference a head's value at the source position is read from that position's residual through layer l's input
norm: the input of the layer's value projection. For every relation and template of the dynamic scores this
module records that real normalised source vector at every layer, from the same prompts as
:func:`maps_utils.dynamic.scores.dynamic_scores`, and compares it with each representation's vector for the same token
(:mod:`maps_utils.static.sources`): the cosine per prompt, averaged per (relation, template, layer). A representation the
static map reads well should point where the real one does at the layers whose heads implement the relations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import relations as R
from ..core.hashing import content_key
from ..core.manifest import build_manifest, call_arguments
from ..core.store import RunOptions, Slots, write_table
from ..heads import HeadWeights
from ..heads.hooks import StopForward, pick, run_until_stop
from ..models.loading import LoadedModel
from ..static import sources
from .capture import build_prompts, pad_batch
from .readouts import ReadoutStore
from .scores import _relations, _subsample, pad_id

ENGINE_VERSION = 1


@torch.inference_mode()
def real_sources(model, weights: HeadWeights, input_ids: Tensor, source: Tensor) -> Tensor:
    """``[B, n_layers, d_model]``: the input of every layer's value projection at each prompt's source position
    (right-padded ``input_ids``, :func:`~maps_utils.dynamic.capture.pad_batch`): the normalised residual the heads read,
    on ``input_ids``' device."""
    L, rows = weights.n_layers, torch.arange(input_ids.shape[0], device=input_ids.device)
    seen: list[Tensor] = []

    def hook(module, args):
        seen.append(pick(args[0], rows, source, to=input_ids.device))
        if len(seen) == L:
            raise StopForward

    handles = [weights.v_module(layer).register_forward_pre_hook(hook) for layer in range(L)]
    run_until_stop(model, handles, input_ids=input_ids, use_cache=False)
    return torch.stack(seen, 1)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of ``[.., d]`` tensors, in float64."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def representation_vectors(weights: HeadWeights, source_ids: Sequence[int], representations: Sequence[str]) -> dict:
    """``{representation: [n, n_layers, d_model]}``: each representation's vector of every source for every layer."""
    layers = range(weights.n_layers)
    out = {}
    with sources.shared_bases():  # each base (and forward pass) of these tokens once
        for r in sources.deepest_first(representations):
            xs = sources.SourceVectors(weights, source_ids, r)
            out[r] = torch.stack([xs.layer(la) for la in layers], 1)
    return {r: out[r] for r in representations}


def template_cosines(loaded: LoadedModel, prompts, vectors: dict[str, Tensor], batch_size: int,
                     stored: Sequence[Tensor] | None = None) -> Tensor:
    """``[n_representations, n_layers]``: the mean cosine over ``prompts`` (prompt i's source is row i of every entry of
    ``vectors``, :func:`representation_vectors`) between each representation and the real normalised source.
    ``stored``: the real sources of each batch of ``batch_size`` prompts as the dynamic scores' pass read them
    (:mod:`maps_utils.dynamic.readouts`); None runs the model."""
    weights = loaded.weights
    total = torch.zeros((len(vectors), weights.n_layers), dtype=torch.float64)
    pad = pad_id(loaded.tokenizer)
    for b, s in enumerate(range(0, len(prompts), batch_size)):
        if stored is not None:
            real = stored[b].to(weights.device)
        else:
            ids, _, src = pad_batch(prompts[s:s + batch_size], pad, weights.device)
            real = real_sources(loaded.model, weights, ids, src)  # [B, L, d]
        for i, made in enumerate(vectors.values()):
            total[i] += _cosine(made[s:s + batch_size], real).sum(0).cpu()
    return total / len(prompts)


def fidelity_profile(
    loaded: LoadedModel,
    representations: Sequence[str],
    relations: Sequence[str | R.Relation] | None = None,
    templates: Sequence[str] | None = None,
    *,
    max_pairs: int | None = None,
    min_pairs: int = R.MIN_PAIRS,
    run: RunOptions = RunOptions(),
) -> pd.DataFrame:
    """Tidy fidelity table: relation, template, representation, layer, cosine, n_prompts (the dynamic scores'
    single-token prompts; ``max_pairs`` subsamples each relation with ``run.seed``, as they do).

    Per-relation results are stored under ``<results_dir>/<model>/dynamic/fidelity/`` keyed by the weights' hash,
    the prompts and the representations (a rerun reads them); ``fidelity.csv`` gets a manifest.
    """
    arguments = call_arguments(locals())
    t0 = time.perf_counter()
    for r in representations:
        sources.check(r)
    templates = list(templates or R.read_templates()["dynamic"])
    out = run.folder(loaded.name, "dynamic", "fidelity")
    slots = Slots(out / "parts" if out is not None else None, enabled=run.use_cache)
    identity = {"engine_version": ENGINE_VERSION, "weights_sha256": loaded.weights_sha256, "dtype": str(loaded.dtype),
                "representations": list(representations), "prefix": list(sources.default_prefix(loaded.weights))}
    frames = []
    rels = _relations(relations)
    passes, from_pass = ReadoutStore(loaded, run), []  # the dynamic scores' passes over the same prompts
    for rel in tqdm(rels, desc="fidelity", disable=not run.progress):
        tr = R.filter_single_token(rel, loaded.tokenizer, leading_space=True, min_pairs=min_pairs)
        if not tr.usable:
            continue
        keep = _subsample(len(tr), max_pairs, run.seed)
        src = [int(tr.source_ids[i]) for i in keep]
        per_template = [build_prompts(loaded.tokenizer, t, [[s] for s in src]) for t in templates]
        key = content_key({**identity, "prompts": [[p.ids, p.source] for ps in per_template for p in ps]})
        table = slots.read(rel.name, key)
        if table is None:
            stored = passes.read(rel.name, per_template, run.batch(64), pad_id(loaded.tokenizer))
            if stored is not None:
                from_pass.append(rel.name)
            table = _relation_table(loaded, rel.name, templates, per_template, src, representations, run,
                                    stored.source_inputs if stored is not None else None)
            slots.write(rel.name, key, table)
        frames.append(pd.DataFrame(table))
    result = pd.concat(frames, ignore_index=True)
    if out is not None:
        manifest = build_manifest(parameters={**arguments, **identity, "sources_from_the_dynamic_pass": from_pass},
                                  wall_seconds=time.perf_counter() - t0,
                                  model=loaded.manifest())
        write_table(result, out / "fidelity.csv", manifest)
    return result


def _relation_table(loaded, name, templates, per_template, src, representations, run,
                    stored=None) -> dict[str, list]:
    rows: dict[str, list] = {c: [] for c in ("relation", "template", "representation", "layer", "cosine", "n_prompts")}
    vectors = representation_vectors(loaded.weights, src, representations)
    for t, (template, prompts) in enumerate(zip(templates, per_template, strict=True)):
        cos = template_cosines(loaded, prompts, vectors, run.batch(64), stored[t] if stored is not None else None)
        for i, r in enumerate(representations):
            for layer in range(cos.shape[1]):
                for col, v in zip(rows, (name, template, r, layer, float(cos[i, layer]), len(prompts)), strict=True):
                    rows[col].append(v)
    return rows


def profile(table: pd.DataFrame) -> pd.DataFrame:
    """Mean cosine per layer (rows) and representation (columns), weighting relations and templates by prompts."""
    t = table.assign(weighted=table.cosine * table.n_prompts)
    g = t.groupby(["layer", "representation"], sort=False)[["weighted", "n_prompts"]].sum()
    return (g.weighted / g.n_prompts).unstack("representation")[list(dict.fromkeys(table.representation))]


def profile_summary(profile_table: pd.DataFrame) -> pd.DataFrame:
    """One row per representation of a :func:`profile` table (layers × representations): its mean cosine over the
    layers, the lowest and highest layer mean, and the layer where it is highest; best first. The per-layer table
    is drawn by :func:`maps_utils.report.plots.fidelity_figure` and stored whole in ``fidelity.csv``."""
    return pd.DataFrame({"mean cosine": profile_table.mean(), "lowest layer mean": profile_table.min(),
                         "highest layer mean": profile_table.max(), "best layer": profile_table.idxmax()}) \
        .rename_axis("representation").sort_values("mean cosine", ascending=False)
