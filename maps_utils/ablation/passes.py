"""The causal experiment's prompts and forward passes: a relation's task, head ablation at the last position, and
accuracy curves as heads are removed cumulatively (see :mod:`maps_utils.ablation.experiment` for the experiment).

Removing a head replaces its slice of the output projection's input (its z) at the last position only, so every
chunk of equal-length prompts runs its prefix once (keeping the KV cache) and each ablation step is one batched
forward pass of the last token, which starts at the step's first ablated layer (the blocks below replay the clean
pass's outputs).
"""

from __future__ import annotations

import copy
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import relations as R
from ..core.params import check_parameters
from ..heads import HeadWeights
from ..models.loading import LoadedModel

log = logging.getLogger(__name__)

Head = tuple[int, int]


def seeded_rng(seed: int, name: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), stream])


# ---- tasks: a relation's causal prompts ------------------------------------------------------------------
@dataclass
class Task:
    """A relation's causal prompts (the filled-in template, tokenised as the model reads it) and targets."""

    name: str
    category: str | None
    template: str
    pairs: list[tuple[str, str]]
    prompts: list[list[int]]
    targets: list[int]
    demo_overlap: int = 0  # sources that also appear as a demonstration word in the template

    @property
    def n(self) -> int:
        return len(self.pairs)


def _subsample(n: int, max_pairs: int | None, seed: int, name: str) -> list[int]:
    if max_pairs is None or n <= max_pairs:
        return list(range(n))
    return sorted(seeded_rng(seed, name, 2).choice(n, size=max_pairs, replace=False).tolist())


def build_task(relation: R.Relation, tokenizer, *, template: str | None = None, max_pairs: int | None = None,
               seed: int = 0, min_pairs: int = R.MIN_PAIRS) -> tuple[Task | None, str | None]:
    """``(task, None)``, or ``(None, reason)`` when the relation has no causal template or too few pairs."""
    template = template or relation.causal_template
    if not template:
        return None, "no causal template"
    tr = R.filter_single_token(relation, tokenizer, leading_space=True, min_pairs=min_pairs)
    if not tr.usable:
        return None, f"{len(tr)} single-token pairs (< {min_pairs})"
    keep = _subsample(len(tr), max_pairs, seed, relation.name)
    pairs = [tr.pairs[i] for i in keep]
    prompts = [list(tokenizer(R.fill(template, s))["input_ids"]) for s, _ in pairs]
    demo = {w.lower() for w in re.findall(r"[^\W\d_]+|\d+", template.replace(R.PLACEHOLDER, " "))}
    return Task(relation.name, relation.category, template, pairs, prompts, [tr.target_ids[i] for i in keep],
                sum(s.lower() in demo for s, _ in pairs)), None


# ---- the forward passes ----------------------------------------------------------------------------------
class HeadAblation:
    """Pre-hooks on every layer's output projection that replace chosen heads' z at the **last** position of
    the current input: by zeros, or by ``replacement[layer, head]`` (``[L, H, d_head]``, mean ablation).

    Set the heads with :meth:`set`; with no heads set the hooks return nothing, so the forward pass is untouched.
    Use as a context manager.
    """

    def __init__(self, weights: HeadWeights, replacement: Tensor | None = None):
        self.weights = weights
        self.replacement = replacement
        self.mask = torch.zeros(weights.n_layers, weights.n_heads, dtype=torch.bool)
        self._any = [False] * weights.n_layers
        self._handles = []

    def set(self, ablated: Sequence[Head]) -> HeadAblation:
        self.mask.zero_()
        for layer, h in ablated:
            self.mask[layer, h] = True
        self._any = self.mask.any(1).tolist()
        return self

    def _hook(self, layer: int):
        def hook(module, args):
            if not self._any[layer]:
                return None
            z = args[0]
            last = self.weights.split_z(z[..., -1, :]).clone()  # [B, H, dh]
            m = self.mask[layer].to(z.device)
            if self.replacement is None:
                last[:, m] = 0
            else:
                last[:, m] = self.replacement[layer].to(device=z.device, dtype=z.dtype)[m]
            z = z.clone()
            z[..., -1, :] = last.flatten(-2)
            return (z, *args[1:])
        return hook

    def __enter__(self) -> HeadAblation:
        for layer in range(self.weights.n_layers):
            self._handles.append(self.weights.out_proj_module(layer).register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def shared_prefix_length(ids: Tensor) -> int:
    """How many leading tokens every row of ``ids`` ``[B, T]`` has in common (at most ``T - 1``)."""
    if ids.shape[0] == 1:
        return ids.shape[1] - 1
    same = (ids == ids[:1]).all(0)
    differ = (~same).nonzero()
    return min(int(differ[0]) if differ.numel() else ids.shape[1], ids.shape[1] - 1)


class _Prefix:
    """One chunk of equal-length prompts with its prefix (all but the last token) run once; :meth:`step`
    runs the last token against the kept KV cache and rolls the cache back afterwards (or, where a sliding window
    is already full and the cache cannot be rolled back, runs against a copy).

    The tokens every prompt of the chunk shares (a few-shot template's demonstrations, the BOS) run once for the
    whole chunk and their cache is repeated over the batch; only the rest of each prompt's prefix runs per prompt.

    With the model's decoder ``blocks`` given, :meth:`clean_step` (no head removed) records every block's output at
    the last token, and ``step(start)`` does not run the blocks below ``start``: they return the recorded outputs.
    Removing heads only at layers >= ``start`` leaves those blocks' inputs, outputs and caches as in the clean step,
    so the logits are the same bits as a full step's (``tests/test_ablation.py``).
    """

    def __init__(self, model, ids: Tensor, blocks: Sequence[torch.nn.Module] = ()):
        self.model, self.last = model, ids[:, -1:]
        self.blocks, self._clean = list(blocks), None
        self.skipped = 0  # block evaluations (prompts x blocks) that steps did not run
        self.cache = None
        n = ids.shape[1]
        self.n_prefix = n - 1
        if n > 1:
            shared = shared_prefix_length(ids) if ids.shape[0] > 1 else 0
            if shared > 1:
                self.cache = model(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=1).past_key_values
                if not hasattr(self.cache, "batch_repeat_interleave"):
                    self.cache, shared = None, 0
                else:
                    self.cache.batch_repeat_interleave(ids.shape[0])
            else:
                shared = 0
            if shared < n - 1:
                self.cache = model(input_ids=ids[:, shared:-1], past_key_values=self.cache, use_cache=True,
                                   logits_to_keep=1).past_key_values
        layers = getattr(self.cache, "layers", [])
        self._copy = any(getattr(layer, "is_sliding", False) and n >= getattr(layer, "sliding_window", n + 1)
                         for layer in layers)

    def clean_step(self) -> Tensor:
        """:meth:`step` with no head removed (the caller's guarantee), recording every block's output."""
        outputs: dict[int, object] = {}
        handles = [block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, _copy_out(out)))
                   for i, block in enumerate(self.blocks)]
        try:
            logits = self.step()
        finally:
            for h in handles:
                h.remove()
        clean = [outputs.get(i) for i in range(len(self.blocks))]
        self._clean = clean if self._replayable() and all(o is not None for o in clean) else None
        return logits

    def _replayable(self) -> bool:
        """Blocks can be skipped: there are some, none has its own ``forward`` already other than accelerate's (a
        wrapper we must not shadow; accelerate's, under a device map or offload, is shadowed for the step and put
        back), and the cache is per layer, one part per block, each able to say its length and crop."""
        if not self.blocks or any("forward" in vars(b) and not _accelerate_forward(b) for b in self.blocks):
            return False
        if self.cache is None or self._copy:
            return True
        layers = getattr(self.cache, "layers", None)
        return layers is not None and len(layers) == len(self.blocks) and all(
            hasattr(layer, "get_seq_length") and hasattr(layer, "crop") for layer in layers)

    def step(self, start: int = 0) -> Tensor:
        """Logits ``[B, vocab]`` at the last position; the blocks below ``start`` replay the clean step's outputs
        (when :meth:`clean_step` recorded them; else every block runs)."""
        start = start if self._clean is not None else 0
        self.skipped += start * self.last.shape[0]
        own = [vars(self.blocks[i]).get("forward") for i in range(start)]  # accelerate's hook, where it has one
        try:
            for i in range(start):
                self.blocks[i].forward = lambda *args, _out=self._clean[i], **kwargs: _out
            return self._step(start)
        finally:
            for i in range(start):
                if own[i] is None:
                    vars(self.blocks[i]).pop("forward", None)
                else:
                    self.blocks[i].forward = own[i]

    def _step(self, start: int) -> Tensor:
        if self.cache is None:
            return self.model(input_ids=self.last, use_cache=False).logits[:, -1]
        cache = copy.deepcopy(self.cache) if self._copy else self.cache
        logits = self.model(input_ids=self.last, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if not self._copy:
            if start:  # the skipped blocks' cache layers did not grow
                _roll_back(cache, self.n_prefix)
            else:
                cache.crop(-1)
        return logits


def _accelerate_forward(block) -> bool:
    """Whether ``block``'s own ``forward`` is accelerate's hook wrapper (a dispatched or offloaded model): the recorded
    output is what it returned (on the block's device), so the step may stand in for it."""
    return "_hf_hook" in vars(block) and "_old_forward" in vars(block)


def _copy_out(out):
    """A block's output (a tensor, or a tuple holding tensors) with its tensors copied; None for anything else (the
    blocks are then always run)."""
    if isinstance(out, Tensor):
        return out.clone()
    if type(out) is tuple:
        return tuple(x.clone() if isinstance(x, Tensor) else x for x in out)
    return None


def _roll_back(cache, length: int) -> None:
    """Crop every cache layer that grew past ``length`` tokens back to it (the blocks a step skipped did not grow;
    :meth:`_Prefix._replayable` checked that every layer can say its length and crop)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


def _chunks(task: Task, batch_size: int, device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(prompt indices, ids, targets)`` per chunk: prompts grouped by length (in first-seen order), then cut
    into chunks of at most ``batch_size``."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(task.prompts):
        by_len.setdefault(len(p), []).append(i)
    out = []
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            sel = idx[s : s + batch_size]
            out.append((torch.tensor(sel), torch.tensor([task.prompts[i] for i in sel], device=device),
                        torch.tensor([task.targets[i] for i in sel], device=device)))
    return out


@torch.inference_mode()
def last_token_logits(loaded: LoadedModel, task: Task, ablated: Sequence[Head] = (), *,
                      replacement: Tensor | None = None, batch_size: int = 256) -> Tensor:
    """Logits ``[n, vocab]`` at each prompt's last position with ``ablated`` heads removed there (the path the
    experiment uses: prefix with KV cache, then the last token)."""
    rows = []
    with HeadAblation(loaded.weights, replacement) as abl:
        for idx, ids, _ in _chunks(task, batch_size, loaded.device):
            abl.set(())  # the prefix runs clean
            pre = _Prefix(loaded.model, ids)
            abl.set(ablated)
            rows.append((idx, pre.step().cpu()))
    out = torch.empty(task.n, rows[0][1].shape[-1], dtype=rows[0][1].dtype)
    for idx, logits in rows:
        out[idx] = logits
    return out


@torch.inference_mode()
def mean_last_z(loaded: LoadedModel, task: Task, batch_size: int = 256) -> Tensor:
    """``[L, H, d_head]``: every head's z at the last position, averaged over the task's prompts (clean run)."""
    weights = loaded.weights
    total = torch.zeros(weights.n_layers, weights.n_heads, weights.d_head, dtype=torch.float64)
    handles = []

    def hook(layer):
        def pre(module, args):
            total[layer] += weights.split_z(args[0][..., -1, :]).double().sum(0).cpu()
        return pre

    for layer in range(weights.n_layers):
        handles.append(weights.out_proj_module(layer).register_forward_pre_hook(hook(layer)))
    try:
        for _, ids, _ in _chunks(task, batch_size, loaded.device):
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return (total / task.n).to(loaded.dtype)


def curve_steps(length: int, n: int | None, keep: Sequence[int] = ()) -> list[int]:
    """The steps (1..``length``) at which a curve is evaluated: all of them when ``n`` is None or ``n >= length``,
    else ``n`` evenly spread ones (the first and the last included) plus ``keep`` (clipped to ``length``)."""
    if length < 1:
        return []
    if n is None or n >= length:
        return list(range(1, length + 1))
    check_parameters(baseline_steps=n)
    spread = {int(round(x)) for x in np.linspace(1, length, n)} if n > 1 else {length}
    return sorted(spread | {min(max(1, int(k)), length) for k in keep})


@torch.inference_mode()
def run_curves(loaded: LoadedModel, task: Task, curves: Sequence[Sequence[Head]], *, replacement: Tensor | None = None,
               batch_size: int = 256, bar: tqdm | None = None, steps: Sequence[Sequence[int] | None] | None = None,
               restart: bool = True, tally: dict[str, int] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Accuracy on ``task`` with no head removed (``base_correct``: per prompt) and, for every curve (an ordered
    head list), after removing its first s heads, s = 1..len: returns ``(base_correct [n] bool, [acc [len+1]])``
    with ``acc[0]`` the base accuracy. ``steps`` (one list per curve, None: every step) evaluates a curve at those
    steps only; the others are NaN. Each chunk's prefix runs once; each step is one batched forward pass, which
    (``restart``) starts at the step's first ablated layer, the blocks below it giving the clean step's outputs: the
    same bits as running them (for the adapter table's families; see ``ArchSpec.replayable_blocks``). ``bar``
    advances by the chunk's prompt count per step; ``tally`` (a dict) gains the block evaluations skipped and all of
    them (prompts x blocks, the clean step included) under "skipped" and "blocks"."""
    steps = [None] * len(curves) if steps is None else list(steps)
    if len(steps) != len(curves):
        raise ValueError(f"{len(curves)} curves but {len(steps)} step lists")
    steps = [curve_steps(len(c), None) if st is None else sorted(set(st)) for c, st in zip(curves, steps, strict=True)]
    for c, st in zip(curves, steps, strict=True):
        if st and not 1 <= st[0] <= st[-1] <= len(c):
            raise ValueError(f"steps must lie in 1..{len(c)} (the curve's length)")
    correct = np.zeros(task.n, dtype=bool)
    counts = [np.zeros(len(c) + 1) for c in curves]
    weights = loaded.weights
    blocks = [weights.block(layer) for layer in range(weights.n_layers)] if restart and weights.spec.replayable_blocks \
        else []
    tally = {"skipped": 0, "blocks": 0} if tally is None else tally
    with HeadAblation(loaded.weights, replacement) as abl:
        for idx, ids, tgt in _chunks(task, batch_size, loaded.device):
            abl.set(())  # the prefix and the first step run clean
            pre = _Prefix(loaded.model, ids, blocks)
            ok = (pre.clean_step().argmax(-1) == tgt).cpu().numpy()
            correct[idx.numpy()] = ok
            for c, curve in enumerate(curves):
                counts[c][0] += ok.sum()
                for s in steps[c]:
                    abl.set(curve[:s])
                    start = min(layer for layer, _ in curve[:s])  # the blocks below it run as in the clean step
                    counts[c][s] += (pre.step(start).argmax(-1) == tgt).sum().item()
                    if bar is not None:
                        bar.update(len(idx))
            tally["skipped"] = tally.get("skipped", 0) + pre.skipped
            tally["blocks"] = tally.get("blocks", 0) + len(idx) * weights.n_layers * (1 + sum(map(len, steps)))
    accs = []
    for cnt, st in zip(counts, steps, strict=True):
        acc = np.full(len(cnt), np.nan)
        acc[[0, *st]] = cnt[[0, *st]] / task.n
        accs.append(acc)
    return correct, accs
