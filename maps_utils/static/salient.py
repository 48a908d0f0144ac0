"""Salient operations (MAPS-SPEC §1.7, §4.1): the tokens a head amplifies most, and what it maps them to.

A token's saliency in head h is its norm amplification ‖x_t W_V W_O[h]‖ / ‖x_t‖; a head's salient operations are its
most amplified tokens, each with the top targets of its row of M = x·W_V·W_O·U (:func:`top_mappings`, chunked over
the vocabulary so nothing of size V×V is formed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.deprecation import renamed_arguments
from ..heads import HeadWeights
from . import sources


@renamed_arguments(variant="representation")
@torch.no_grad()
def top_mappings(
    weights: HeadWeights,
    layer: int,
    head: int,
    token_ids: Sequence[int] | Tensor,
    k: int = 5,
    *,
    representation: str = "first_mlp",
    suppression: bool = False,
    chunk: int = 32768,
    prefix: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k targets of the given sources' rows of M for one head: ``(values, ids)``, each ``[n, k]``.

    The vocabulary is processed in chunks, so memory stays at n × chunk.
    """
    x = sources.source_vectors(weights, token_ids, representation, layer, prefix=prefix)
    w = weights.ov(layer).head_write(head, x)  # [n, d]
    if suppression:
        w = -w
    best_v = w.new_full((w.shape[0], 0), float("-inf"))
    best_i = torch.zeros((w.shape[0], 0), dtype=torch.long, device=w.device)
    for start in range(0, weights.vocab_size, chunk):
        s = w @ weights.U_block(start, start + chunk)
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_v, idx = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, idx)
    return best_v, best_i


@renamed_arguments(variant="representation")
@torch.no_grad()
def saliency(
    weights: HeadWeights,
    *,
    representation: str = "first_mlp_all",
    chunk: int = 8192,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    prefix: Sequence[int] | None = None,
) -> Tensor:
    """``[n_layers, n_heads, V]`` norm amplification ‖x_t W_VO‖ / ‖x_t‖ of every token for every head.

    Uses ‖y W_O‖² = y (W_O W_Oᵀ) yᵀ with y = x W_V, so W_VO (d×d) is never formed. The default
    representation is the paper's salient-operations choice (MLP0 for every layer, MAPS-SPEC §8.1). A forward-pass
    representation (``context_free``) runs one batched pass per chunk of the vocabulary.
    """
    sources.check(representation)
    dtype = dtype or weights.dtype
    L, H, V = weights.n_layers, weights.n_heads, weights.vocab_size
    out = torch.empty((L, H, V), dtype=torch.float32)
    ovs, gram = [], []  # per layer W_V and the Gram matrix W_O W_Oᵀ [H, dh, dh]; W_O itself is not kept (streaming)
    for layer in range(L):
        ov = weights.ov(layer).to(dtype)
        gram.append(ov.out_gram())
        ovs.append(dataclasses.replace(ov, W_O=ov.W_O.new_empty(0)))
    device = weights.device
    for start in tqdm(range(0, V, chunk), desc=f"saliency ({representation})", disable=not progress):
        ids = torch.arange(start, min(V, start + chunk), device=device)
        xs = sources.SourceVectors(weights, ids, representation, prefix=prefix, dtype=dtype)
        for layer in range(L):
            x = xs.layer(layer)
            y = ovs[layer].head_values(x)  # [H, n, dh]
            sq = torch.einsum("hne,hef,hnf->hn", y, gram[layer], y).clamp_min(0)
            xn = torch.linalg.vector_norm(x, dim=1).clamp_min(torch.finfo(dtype).tiny)
            out[layer, :, start : start + ids.numel()] = (sq.sqrt() / xn).float().cpu()
    return out


@renamed_arguments(variant="representation")
@torch.no_grad()
def salient_operations(
    weights: HeadWeights,
    tokenizer=None,
    *,
    n_tokens: int = 15,
    n_mappings: int = 5,
    representation: str = "first_mlp_all",
    heads_subset: Sequence[tuple[int, int]] | None = None,
    saliency_scores: Tensor | None = None,
    progress: bool = True,
):
    """Each head's salient operations (MAPS-SPEC §1.7, §4.1): its top ``n_tokens`` tokens by norm
    amplification and, for each, the top ``n_mappings`` targets of its row of M.

    Returns a tidy DataFrame (layer, head, rank, token_id, token, saliency, mapping_ids, mappings).
    ``saliency_scores`` (from :func:`saliency`) is reused when given; tokens are decoded when a
    tokenizer is given. The default representation is the paper's for this analysis (MLP0 for all layers).
    """
    sal = saliency(weights, representation=representation, progress=progress) if saliency_scores is None else saliency_scores
    pairs = heads_subset or [(la, h) for la in range(weights.n_layers) for h in range(weights.n_heads)]
    rows = []
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
    for layer, h in pairs:
        values, ids = torch.topk(sal[layer, h], n_tokens)
        _, maps = top_mappings(weights, layer, h, ids.to(weights.device), n_mappings, representation=representation)
        for rank, (tid, value, mapped) in enumerate(zip(ids.tolist(), values.tolist(), maps.tolist(), strict=True)):
            rows.append({"layer": layer, "head": h, "rank": rank, "token_id": tid, "token": decode(tid),
                         "saliency": value, "mapping_ids": mapped, "mappings": [decode(m) for m in mapped]})
    return pd.DataFrame(rows)
