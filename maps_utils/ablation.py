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
"""

from __future__ import annotations

import copy
import logging
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import relations as R
from .dynamic import write_table
from .hashing import content_key
from .heads import HeadWeights
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

Head = tuple[int, int]


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


def _rng(seed: int, name: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), stream])


def random_heads(n_layers: int, n_heads: int, exclude: Sequence[Head], count: int, n_samples: int, seed: int,
                 name: str) -> list[list[Head]]:
    """``n_samples`` random orders of ``count`` heads drawn without replacement from the heads not in ``exclude``
    (fewer when fewer are left), seeded by ``seed`` and ``name``."""
    banned = set(map(tuple, exclude))
    pool = [(layer, h) for layer in range(n_layers) for h in range(n_heads) if (layer, h) not in banned]
    rng = _rng(seed, name, 0)
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
    order = [candidates[i] for i in _rng(seed, main, 1).permutation(len(candidates))]
    chosen = []
    for other in order:
        if len(chosen) == max_controls:
            break
        if overlap(heads[main], heads[other]) < max_overlap and abs(base[other] - base[main]) <= max_base_gap + 1e-12:
            chosen.append(other)
    return chosen


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
    return sorted(_rng(seed, name, 2).choice(n, size=max_pairs, replace=False).tolist())


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

    def __init__(self, heads: HeadWeights, replacement: Tensor | None = None):
        self.heads = heads
        self.replacement = replacement
        self.mask = torch.zeros(heads.n_layers, heads.n_heads, dtype=torch.bool)
        self._any = [False] * heads.n_layers
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
            last = self.heads.split_z(z[..., -1, :]).clone()  # [B, H, dh]
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
        for layer in range(self.heads.n_layers):
            self._handles.append(self.heads.out_proj_module(layer).register_forward_pre_hook(self._hook(layer)))
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
    """

    def __init__(self, model, ids: Tensor):
        self.model, self.last = model, ids[:, -1:]
        self.cache = None
        n = ids.shape[1]
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

    def step(self) -> Tensor:
        """Logits ``[B, vocab]`` at the last position."""
        if self.cache is None:
            return self.model(input_ids=self.last, use_cache=False).logits[:, -1]
        cache = copy.deepcopy(self.cache) if self._copy else self.cache
        logits = self.model(input_ids=self.last, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if not self._copy:
            cache.crop(-1)
        return logits


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
    with HeadAblation(loaded.heads, replacement) as abl:
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
    heads = loaded.heads
    total = torch.zeros(heads.n_layers, heads.n_heads, heads.d_head, dtype=torch.float64)
    handles = []

    def hook(layer):
        def pre(module, args):
            total[layer] += heads.split_z(args[0][..., -1, :]).double().sum(0).cpu()
        return pre

    for layer in range(heads.n_layers):
        handles.append(heads.out_proj_module(layer).register_forward_pre_hook(hook(layer)))
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
    if n < 1:
        raise ValueError("baseline_steps must be a positive integer (None: every step).")
    spread = {int(round(x)) for x in np.linspace(1, length, n)} if n > 1 else {length}
    return sorted(spread | {min(max(1, int(k)), length) for k in keep})


@torch.inference_mode()
def run_curves(loaded: LoadedModel, task: Task, curves: Sequence[Sequence[Head]], *, replacement: Tensor | None = None,
               batch_size: int = 256, bar: tqdm | None = None,
               steps: Sequence[Sequence[int] | None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Accuracy on ``task`` with no head removed (``base_correct``: per prompt) and, for every curve (an ordered
    head list), after removing its first s heads, s = 1..len: returns ``(base_correct [n] bool, [acc [len+1]])``
    with ``acc[0]`` the base accuracy. ``steps`` (one list per curve, None: every step) evaluates a curve at those
    steps only; the others are NaN. Each chunk's prefix runs once; each step is one batched forward pass.
    ``bar`` advances by the chunk's prompt count per step."""
    steps = [None] * len(curves) if steps is None else list(steps)
    if len(steps) != len(curves):
        raise ValueError(f"{len(curves)} curves but {len(steps)} step lists")
    steps = [curve_steps(len(c), None) if st is None else sorted(set(st)) for c, st in zip(curves, steps, strict=True)]
    for c, st in zip(curves, steps, strict=True):
        if st and not 1 <= st[0] <= st[-1] <= len(c):
            raise ValueError(f"steps must lie in 1..{len(c)} (the curve's length)")
    correct = np.zeros(task.n, dtype=bool)
    counts = [np.zeros(len(c) + 1) for c in curves]
    with HeadAblation(loaded.heads, replacement) as abl:
        for idx, ids, tgt in _chunks(task, batch_size, loaded.device):
            abl.set(())  # the prefix runs clean
            pre = _Prefix(loaded.model, ids)
            ok = (pre.step().argmax(-1) == tgt).cpu().numpy()
            correct[idx.numpy()] = ok
            for c, curve in enumerate(curves):
                counts[c][0] += ok.sum()
                for s in steps[c]:
                    abl.set(curve[:s])
                    counts[c][s] += (pre.step().argmax(-1) == tgt).sum().item()
                    if bar is not None:
                        bar.update(len(idx))
    accs = []
    for cnt, st in zip(counts, steps, strict=True):
        acc = np.full(len(cnt), np.nan)
        acc[[0, *st]] = cnt[[0, *st]] / task.n
        accs.append(acc)
    return correct, accs


# ---- the experiment ------------------------------------------------------------------------------------
CURVE_TYPES = ("relation", "random", "control")


@dataclass
class AblationResult:
    """Everything the causal experiment produced for one model and ablation kind (tidy tables)."""

    model: str
    kind: str
    tasks: pd.DataFrame  # relation, category, in_paper, template, n_pairs, demo_overlap, base, status
    heads: pd.DataFrame  # relation, rank, layer, head, score
    controls: pd.DataFrame  # relation, control, overlap, base, control_base
    curves: pd.DataFrame  # relation, task, curve, sample, step, accuracy, n_prompts
    manifest: dict = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    def curve(self, relation: str, curve: str = "relation", task: str | None = None) -> pd.DataFrame:
        sel = self.curves[(self.curves.relation == relation) & (self.curves.curve == curve)]
        return sel if task is None else sel[sel.task == task]

    def summary(self) -> pd.DataFrame:
        """The paper's table, numeric: per relation #heads removed (first step reaching accuracy 0, else all its
        heads), base and post-removal accuracy (−TR), random heads at the same count (mean ± std over samples),
        control tasks (mean ± std of base and post-removal accuracy), and % changes."""
        rows = []
        for rel in self.tasks[self.tasks.status == "run"].relation:
            acc = self.curve(rel).sort_values("step").accuracy.to_numpy()
            m = len(acc) - 1
            zero = np.flatnonzero(acc[1:] == 0)
            s = int(zero[0]) + 1 if zero.size else m
            base, tr = acc[0], acc[s]

            rnd = np.array([_at(g, s)[1] for _, g in self.curve(rel, "random").groupby("sample")])
            ctr = np.array([_at(g, s) for _, g in self.curve(rel, "control").groupby("task")]).reshape(-1, 2)
            task = self.tasks.set_index("relation").loc[rel]
            rows.append({
                "relation": rel, "category": task.category, "in_paper": bool(task.in_paper), "n_pairs": int(task.n_pairs),
                "relation_heads": m, "heads_removed": s, "base": base, "tr": tr,
                "rnd_mean": rnd.mean() if rnd.size else np.nan, "rnd_std": rnd.std() if rnd.size else np.nan,
                "n_ctrl": len(ctr),
                "base_ctr_mean": ctr[:, 0].mean() if len(ctr) else np.nan,
                "base_ctr_std": ctr[:, 0].std() if len(ctr) else np.nan,
                "tr_ctr_mean": ctr[:, 1].mean() if len(ctr) else np.nan,
                "tr_ctr_std": ctr[:, 1].std() if len(ctr) else np.nan,
            })
        out = pd.DataFrame(rows, columns=[
            "relation", "category", "in_paper", "n_pairs", "relation_heads", "heads_removed", "base", "tr", "rnd_mean",
            "rnd_std", "n_ctrl", "base_ctr_mean", "base_ctr_std", "tr_ctr_mean", "tr_ctr_std"])
        def pct(after, base):  # undefined (NaN) from a base of 0
            return 100 * (after - base) / base.where(base != 0)

        out["tr_change_pct"] = pct(out.tr, out.base)
        out["rnd_change_pct"] = pct(out.rnd_mean, out.base)
        out["ctr_change_pct"] = pct(out.tr_ctr_mean, out.base_ctr_mean)
        return out

    def paper_table(self) -> pd.DataFrame:
        """:meth:`summary` laid out as the paper's table (``↓48% → 0.46``, ``0.88 ± 0.03``)."""
        return paper_layout(self.summary())

    def write(self, results_dir: str | Path) -> Path:
        """Write every table (CSV + manifest) under ``<results_dir>/<model>/ablation/<kind>/``."""
        out = Path(results_dir) / model_slug(self.model) / "ablation" / self.kind
        for name, table in (("tasks", self.tasks), ("heads", self.heads), ("controls", self.controls),
                            ("curves", self.curves), ("summary", self.summary())):
            write_table(table, out / f"{name}.csv", self.manifest)
        return out


def _at(curve: pd.DataFrame, step: int) -> tuple[float, float]:
    """A curve's base accuracy and its accuracy after ``step`` heads (its last evaluated step up to ``step``: a
    shorter random sample counts with all its heads; baselines are always evaluated at the table's step)."""
    curve = curve.sort_values("step")
    return curve.accuracy.iloc[0], curve[curve.step <= step].accuracy.iloc[-1]


def _change(base: float, after: float, std: float | None = None) -> str:
    if not np.isfinite(after):
        return "—"
    tail = f" ± {std:.2f}" if std is not None else ""
    if not base:
        return f"→ {after:.2f}{tail}"  # no relative change from a base of 0
    pct = 100 * (after - base) / base
    return f"{'↓' if pct < 0 else '↑'}{abs(pct):.0f}% → {after:.2f}{tail}"


def paper_layout(summary: pd.DataFrame) -> pd.DataFrame:
    """A numeric summary (:meth:`AblationResult.summary`) as the paper's table of strings."""
    rows = []
    for r in summary.itertuples():
        ctrl = r.n_ctrl > 0
        rows.append({
            "Relation": r.relation, "#Heads removed": r.heads_removed, "Base": f"{r.base:.2f}",
            "−TR": _change(r.base, r.tr),
            "−RND": _change(r.base, r.rnd_mean, r.rnd_std) if np.isfinite(r.rnd_mean) else "—",
            "# tasks": r.n_ctrl,
            "Base (CTR)": f"{r.base_ctr_mean:.2f} ± {r.base_ctr_std:.2f}" if ctrl else "—",
            "−TR (CTR)": _change(r.base_ctr_mean, r.tr_ctr_mean, r.tr_ctr_std) if ctrl else "—",
        })
    return pd.DataFrame(rows)


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
