"""One forward pass of the dynamic scores: prompts from a template, each head's z at the last position and its value
at the source position, their writes through W_O and the target ranks of those writes (MAPS-SPEC §1.4).

The forward pass stops after the last layer's attention, so no MLP of the last layer and no LM head is computed.
Prompts are padded on the right and every prompt keeps its own last and source positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import relations as R
from ..heads import HeadWeights
from ..heads.hooks import StopForward, pick, run_until_stop
from ..static.ranks import Columns, ranks_of_targets, scan_columns

log = logging.getLogger(__name__)


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
READOUTS = ("source_inputs", "attention")
"""What the same pass can also read for later steps: ``source_inputs`` ``[B, L, d_model]``, the input of every layer's
value projection at the source position (the normalised residual the heads read: the fidelity profile's real source,
:func:`maps_utils.dynamic.fidelity.real_sources`), and ``attention`` ``[B, L, H, T]``, every head's attention weights
from the last position (:func:`maps_utils.qk.inference.real_attention`; None where the model does not return them)."""


@torch.inference_mode()
def capture(model, weights: HeadWeights, input_ids: Tensor, last: Tensor, source: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``model`` once on right-padded ``input_ids`` (see :func:`pad_batch`); return ``z_last`` ``[B, L, n_heads, d_head]`` (every head's mixed value at each
    prompt's last position: its real, in-context output before W_O) and ``v_source`` ``[B, L, n_kv, d_head]``
    (the value vectors at each prompt's source position, bias included), both on ``input_ids``' device (each layer's
    are read where the layer runs, under a device map)."""
    out = capture_readouts(model, weights, input_ids, last, source)
    return out["z_last"], out["v_source"]


@torch.inference_mode()
def capture_readouts(model, weights: HeadWeights, input_ids: Tensor, last: Tensor, source: Tensor,
                     readouts: Sequence[str] = ()) -> dict[str, Tensor | None]:
    """:func:`capture`'s ``z_last`` and ``v_source``, and each of ``readouts`` (:data:`READOUTS`), from one forward pass
    of right-padded ``input_ids``. The pass stops after the last layer's attention; every readout is read from the
    same tensors a pass that reads only it would compute, so it is bit-identical to that pass's."""
    unknown = set(readouts) - set(READOUTS)
    if unknown:
        raise ValueError(f"unknown readouts {sorted(unknown)}; use some of {', '.join(READOUTS)}")
    L, B = weights.n_layers, input_ids.shape[0]
    home, rows = input_ids.device, torch.arange(B, device=input_ids.device)
    seen: dict[str, list] = {name: [None] * L for name in ("z_last", "v_source", *readouts)}
    stop_after_attention = "attention" in readouts  # the last layer's attention weights come after its W_O

    def z_hook(layer):
        def hook(mod, args):
            seen["z_last"][layer] = weights.split_z(pick(args[0], rows, last, to=home))
            if layer == L - 1 and not stop_after_attention:
                raise StopForward  # nothing after the last layer's attention is needed
        return hook

    def v_hook(layer):
        def hook(mod, args, out):
            seen["v_source"][layer] = weights.values_from_output(pick(out, rows, source, to=home))
        return hook

    def input_hook(layer):
        def hook(mod, args):
            seen["source_inputs"][layer] = pick(args[0], rows, source, to=home)
        return hook

    def attention_hook(layer):
        def hook(mod, args, output):
            a = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            seen["attention"][layer] = pick(a.transpose(1, 2), rows, last, to=home) if isinstance(a, Tensor) else None
            if layer == L - 1:
                raise StopForward
        return hook

    handles = []
    for layer in range(L):
        if "source_inputs" in readouts:  # registered first: it reads the v module's input before anything else
            handles.append(weights.v_module(layer).register_forward_pre_hook(input_hook(layer)))
        handles.append(weights.out_proj_module(layer).register_forward_pre_hook(z_hook(layer)))
        handles.append(weights.v_module(layer).register_forward_hook(v_hook(layer)))
        if stop_after_attention:
            handles.append(weights.attn_module(layer).register_forward_hook(attention_hook(layer)))
    run_until_stop(model, handles, input_ids=input_ids, use_cache=False)
    out = {name: torch.stack(parts, 1) for name, parts in seen.items() if name != "attention"}
    if "attention" in readouts:
        out["attention"] = None if any(a is None for a in seen["attention"]) else torch.stack(seen["attention"], 1)
    return out


def head_writes(weights: HeadWeights, z_last: Tensor, v_source: Tensor) -> tuple[Tensor, Tensor]:
    """``(with_context, without_context)`` head writes ``[B, L, n_heads, d_model]`` (no b_O):
    ``z_h W_O[h]`` and ``v_source[g(h)] W_O[h]``."""
    groups = weights.kv_groups.to(v_source.device)
    w_o = torch.stack([weights.W_O(layer) for layer in range(weights.n_layers)]).to(z_last)  # [L, H, dh, d]
    with_ctx = torch.einsum("blhe,lhem->blhm", z_last, w_o)
    without = torch.einsum("blhe,lhem->blhm", v_source[:, :, groups], w_o)
    return with_ctx, without


def model_columns(weights: HeadWeights, dtype: torch.dtype | None = None) -> Columns:
    """The unembedding in the static engine's scan order (shared by every row; cached on ``weights``)."""
    return scan_columns(weights, dtype)


@torch.inference_mode()
def prompt_ranks(
    model,
    weights: HeadWeights,
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
    readouts: dict[str, list] | None = None,
) -> Tensor:
    """Target ranks of every prompt's head writes: ``int16 [4, n, L, H]`` = (with-context top, with-context
    bottom, without-context top, without-context bottom); a rank equal to ``rank_cap`` means ">= cap".

    ``readouts`` (names of :data:`READOUTS`, each to an empty list) gets, per batch of ``batch_size`` prompts, what
    the same forward pass read (on the CPU), for the steps that read these prompts again."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = weights.device
    columns = columns or model_columns(weights)
    L, H, n = weights.n_layers, weights.n_heads, len(prompts)
    out = torch.empty((4, n, L, H), dtype=torch.int16)
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, leave=False, disable=not progress or len(starts) < 2):
        batch = prompts[s : s + batch_size]
        B = len(batch)
        seen = capture_readouts(model, weights, *pad_batch(batch, pad_id, device), readouts=tuple(readouts or ()))
        for name, parts in (readouts or {}).items():
            parts.append(None if seen[name] is None else seen[name].cpu())
        with_ctx, without = head_writes(weights, seen["z_last"], seen["v_source"])
        rows = torch.cat([with_ctx, without]).reshape(-1, weights.d_model).to(columns.cols.dtype)
        tgt = torch.as_tensor(targets[s : s + batch_size], device=device)
        tgt = tgt[:, None].expand(B, L * H).reshape(-1).repeat(2)
        top, bottom = ranks_of_targets(rows, tgt, columns, rank_cap, memory_budget_mb)
        top, bottom = top.view(2, B, L, H), bottom.view(2, B, L, H)
        out[0, s : s + B], out[1, s : s + B] = top[0].cpu(), bottom[0].cpu()
        out[2, s : s + B], out[3, s : s + B] = top[1].cpu(), bottom[1].cpu()
    return out
