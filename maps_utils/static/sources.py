"""Source representations: the vector x_s that a head's static map M = x_s·W_V·W_O·U reads for source token s.

The paper builds x_s from the parameters alone (MAPS-SPEC §1.3): the raw embedding, or block 0's MLP branch
applied to it. On Gemma-3 neither resembles what the heads read at inference (issue 19), so this module names
those and the candidates measured beside them. A name is a base, optionally followed by ``+norm``:

* ``raw``: E for every layer (the paper's choice for Llama-3.1-70B).
* ``first_mlp``: the paper's relation scores: E for layer-0 heads, MLP0(E) for layers >= 1.
* ``first_mlp_all``: MLP0(E) for every layer (the paper's salient-operations choice, MAPS-SPEC §8.1).
* ``raw_mlp``: E + MLP0(E), block 0's residual without its attention (E for layer-0 heads).
* ``block0``: the residual after block 0 for the token alone, a one-token forward pass in which the token can
  only attend to itself (E for layer-0 heads). Still a function of the parameters only.
* ``+centre`` (any of the above): minus the representation's mean over a fixed vocabulary sample (the
  :data:`STAT_TOKENS` evenly spaced token ids, under the same base and layer).
* ``+nomassive`` (any of the above): with the massive dimensions set to zero: those whose mean absolute value
  over the same sample exceeds :data:`MASSIVE_FACTOR` times the median dimension's.
* ``+norm`` (any of the above, after a modifier if one is given): then layer l's own input norm module, exactly as
  the model applies it before its attention (its gain; centring and bias for LayerNorm). Without it, no norm is
  applied (the paper's choice).
* ``context_free``: the token's own residual at the input of layer l in a forward pass of ``[prefix, s]``, where the
  prefix is the model's BOS (``config.bos_token_id``; nothing where the model has none), then through layer l's
  input norm. It needs no prompt context, but it is no longer read from the parameters alone.
* ``context_free_N``: the same pass through the first N blocks only, held fixed after them: layer l reads the
  residual after ``min(l, N)`` blocks, through layer l's own input norm. The N at which the scores settle is
  how many blocks the model needs to finish rewriting a token.

:class:`SourceVectors` gives one token set's vectors for any layer; the forward-pass bases run one batched
pass per chunk of tokens (the prefix's keys and values computed once and reused; stopped after the deepest layer
they need), once per token set. Inside :func:`shared_bases` every representation of the same token set shares its
bases: E and MLP0(E) are computed once, and one forward pass to the deepest layer any of them needs serves the
others (``block0``, ``context_free`` and each ``context_free_N``; a shallower pass gives the same bits as the first
layers of a deeper one). A study that compares representations (notebook 02's grid, the fidelity profile) runs in
one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.deprecation import renamed_function
from ..core.errors import OptionError
from ..heads import HeadWeights
from ..heads.hooks import StopForward, run_until_stop

PAPER = ("first_mlp", "raw", "first_mlp_all")
PARAMETER_BASES = ("raw", "first_mlp", "first_mlp_all", "raw_mlp", "block0")
FORWARD_BASES = ("block0", "context_free")
MODIFIERS = ("centre", "nomassive")
NORM = "+norm"
CHUNK = 2048  # tokens per forward pass of the forward-pass bases
STAT_TOKENS = 4096  # vocabulary sample for +centre and +nomassive
MASSIVE_FACTOR = 10.0  # +nomassive: a dimension is massive above this multiple of the median mean |x|
_NAME = re.compile(r"^(?P<base>raw|first_mlp_all|first_mlp|raw_mlp|block0)(?:\+(?P<mod>centre|nomassive))?"
                   r"(?P<norm>\+norm)?$"
                   r"|^context_free(?:_(?P<depth>[1-9][0-9]*))?$")


@dataclass(frozen=True)
class Representation:
    """A parsed source-representation name (see the module docstring)."""

    name: str
    base: str
    norm: bool
    depth: int | None = None  # context_free_N: blocks run before the residual is held fixed
    modifier: str | None = None  # "centre" or "nomassive" (see the module docstring)

    @property
    def forward_pass(self) -> bool:
        """Whether it needs a forward pass of the model (not only matrix products of its parameters)."""
        return self.base in FORWARD_BASES

    @property
    def parameters_only(self) -> bool:
        """Whether it is read from the parameters alone (``context_free`` reads a forward pass after BOS)."""
        return self.base != "context_free"

    def blocks_before(self, layer: int) -> int:
        """How many blocks the token's residual has passed before layer ``layer`` reads it."""
        if self.base == "context_free":
            return layer if self.depth is None else min(layer, self.depth)
        if self.base == "first_mlp_all" or layer > 0:
            return 0 if self.base == "raw" else 1
        return 0


def parse(name: str) -> Representation:
    """The :class:`Representation` of ``name``, or an :class:`~maps_utils.core.errors.OptionError` naming the valid ones."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise OptionError(f"Unknown source representation {name!r}; use one of {', '.join(PARAMETER_BASES)} "
                          f"(each optionally with '+centre' or '+nomassive', then '{NORM}'), context_free or "
                          "context_free_N (N >= 1 blocks).")
    if m.group("base"):
        return Representation(name, m.group("base"), bool(m.group("norm")), modifier=m.group("mod"))
    depth = m.group("depth")
    return Representation(name, "context_free", True, int(depth) if depth else None)


def salient_representation(registered: str) -> str:
    """The source representation of salient operations for a model registered with ``registered``: the paper's
    ``first_mlp_all`` where the registered one is one of the paper's, else the registered one (e.g. ``context_free``)."""
    return "first_mlp_all" if registered in PAPER else registered


salient_variant = renamed_function(salient_representation, "salient_variant")


def names(depths: Sequence[int] = (), modifiers: Sequence[str] = ()) -> list[str]:
    """Every parameter-only base, with and without ``+norm`` (and each of ``modifiers`` before it), then
    ``context_free`` and ``context_free_N`` for each of ``depths``."""
    mods = [""] + [f"+{m}" for m in modifiers]
    return ([base + mod + norm for base in PARAMETER_BASES for mod in mods for norm in ("", NORM)]
            + ["context_free"] + [f"context_free_{n}" for n in depths])


def check(name: str) -> None:
    parse(name)


def default_prefix(weights: HeadWeights) -> tuple[int, ...]:
    """The tokens before the source in a context-free pass: the model's BOS, or nothing where it has none (or its
    config names an id outside the embedding, as untrained configs can)."""
    bos = getattr(weights.model.config, "bos_token_id", None)
    rows = weights.spec.embed(weights.model).weight.shape[0]
    return (int(bos),) if isinstance(bos, int) and 0 <= bos < rows else ()


@torch.inference_mode()
def residuals(weights: HeadWeights, token_ids: Tensor | Sequence[int], prefix: Sequence[int], depth: int) -> Tensor:
    """``[depth + 1, n, d_model]``: each token's residual at the input of layers 0..depth (``depth`` < n_layers) in
    a forward pass of ``[*prefix, token]``, read at the token's position from the input of each block.

    The prefix runs once; its keys and values are reused for every token (a chunk of :data:`CHUNK` tokens is one
    batch of length-1 sequences after it). The pass stops once layer ``depth``'s input has been read.
    """
    if not 0 <= depth < weights.n_layers:
        raise ValueError(f"depth {depth} must be in 0..{weights.n_layers - 1}")
    device = weights.device
    ids = torch.as_tensor(token_ids, device=device).reshape(-1)
    cache = None
    if prefix:
        cache = weights.model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True).cache
    out = []
    for start in range(0, ids.numel(), CHUNK):
        chunk = ids[start:start + CHUNK, None]  # [n, 1]
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(chunk))
        out.append(_read_residuals(weights, chunk, depth, past))
    return torch.cat(out, 1) if out else torch.empty((depth + 1, 0, weights.d_model))


def _read_residuals(weights: HeadWeights, batch: Tensor, depth: int, past) -> Tensor:
    """``[depth + 1, n, d_model]`` on ``batch``'s device (each block's input is read where the block runs)."""
    seen: list[Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # the residual entering the block
        seen.append(hidden[:, -1].to(batch.device, copy=True))  # [n, d]: at the token's position
        if len(seen) > depth:
            raise StopForward

    handles = [weights.block(layer).register_forward_pre_hook(hook, with_kwargs=True) for layer in range(depth + 1)]
    run_until_stop(weights.model, handles, input_ids=batch, cache=past, use_cache=past is not None)
    return torch.stack(seen)


_SHARED: list[dict] = []  # the open shared_bases scopes' caches (innermost last)


@contextlib.contextmanager
def shared_bases() -> Iterator[None]:
    """Within this block, :class:`SourceVectors` of the same model and token set share their bases (E, MLP0(E) and
    the forward-pass residuals, see the module docstring); they are dropped when it ends. Results are identical."""
    _SHARED.append({})
    try:
        yield
    finally:
        _SHARED.pop()


def deepest_first(names: Sequence[str]) -> list[str]:
    """``names`` in the order to compute them inside :func:`shared_bases`: the deepest forward pass first (``context_free``,
    then ``context_free_N`` by decreasing N, then ``block0``), so the shallower ones are read from it; otherwise as
    given."""
    def depth(name: str) -> float:
        rep = parse(name)
        if rep.base == "context_free":
            return float("inf") if rep.depth is None else rep.depth
        return 1 if rep.base == "block0" else 0
    return sorted(dict.fromkeys(names), key=lambda n: -depth(n))


def _token_key(weights: HeadWeights, ids: Tensor, *what) -> tuple:
    digest = hashlib.sha256(ids.detach().cpu().numpy().tobytes()).hexdigest()
    return (id(weights), str(ids.dtype), digest, *what)


def _shared(weights: HeadWeights, ids: Tensor, what: tuple, compute) -> Tensor:
    """``compute()``, or the value an earlier call in the open :func:`shared_bases` scope computed for the same
    model, tokens and ``what``."""
    if not _SHARED:
        return compute()
    cache, key = _SHARED[-1], _token_key(weights, ids, *what)
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _shared_residuals(weights: HeadWeights, ids: Tensor, prefix: tuple, deepest: int) -> Tensor:
    """:func:`residuals` to ``deepest``, sliced from a deeper pass of the same tokens and prefix in the open
    :func:`shared_bases` scope when there is one (the same bits: the first blocks run the same computation)."""
    if not _SHARED:
        return residuals(weights, ids, prefix, deepest)
    cache, key = _SHARED[-1], _token_key(weights, ids, "residuals", prefix)
    if key not in cache or cache[key].shape[0] <= deepest:
        cache[key] = residuals(weights, ids, prefix, deepest)
    return cache[key][:deepest + 1]


class SourceVectors:
    """The source vectors of one token set under one representation, for any layer (see the module docstring).

    Forward-pass residuals are computed once, on first use, for the deepest layer asked for at construction
    (``layers``; default all) and kept; parameter-only bases cost one embedding lookup and at most one MLP0 pass.
    """

    def __init__(self, weights: HeadWeights, token_ids: Tensor | Sequence[int], representation: str, *,
                 layers: Sequence[int] | None = None, prefix: Sequence[int] | None = None,
                 dtype: torch.dtype | None = None):
        self.weights = weights
        self.rep = parse(representation)
        self.ids = torch.as_tensor(token_ids, device=weights.device)
        self.layers = list(range(weights.n_layers)) if layers is None else list(layers)
        self.prefix = default_prefix(weights) if prefix is None else tuple(int(i) for i in prefix)
        self.dtype = dtype or weights.dtype
        self._cache: dict[str, Tensor] = {}

    def _raw(self) -> Tensor:
        if "raw" not in self._cache:
            self._cache["raw"] = _shared(self.weights, self.ids, ("raw",), lambda: self.weights.embed(self.ids))
        return self._cache["raw"]

    def _mlp(self) -> Tensor:
        if "mlp" not in self._cache:
            self._cache["mlp"] = _shared(self.weights, self.ids, ("mlp",), lambda: self.weights.first_mlp(self._raw()))
        return self._cache["mlp"]

    def _residual(self, blocks: int) -> Tensor:
        if "residuals" not in self._cache:
            prefix = self.prefix if self.rep.base == "context_free" else ()
            deepest = max(self.rep.blocks_before(la) for la in self.layers)
            self._cache["residuals"] = _shared_residuals(self.weights, self.ids, tuple(prefix), deepest)
        return self._cache["residuals"][blocks]

    def _base(self, layer: int) -> Tensor:
        blocks = self.rep.blocks_before(layer)
        if blocks == 0 and self.rep.base != "context_free":
            return self._raw()
        if self.rep.base in ("first_mlp", "first_mlp_all"):
            return self._mlp()
        if self.rep.base == "raw_mlp":
            return self._raw() + self._mlp()
        return self._residual(blocks)

    def _sample_stats(self, layer: int) -> tuple[Tensor, Tensor]:
        """The base's mean ``[d]`` and mean absolute value ``[d]`` for ``layer`` over the vocabulary sample."""
        key = f"stats{self.rep.blocks_before(layer)}"
        if key not in self._cache:
            if "sample" not in self._cache:
                rows = self.weights.spec.embed(self.weights.model).weight.shape[0]
                ids = torch.linspace(0, rows - 1, min(STAT_TOKENS, rows)).round().long().unique()
                self._cache["sample"] = SourceVectors(self.weights, ids, self.rep.base, layers=self.layers,
                                                      prefix=self.prefix, dtype=self.dtype)
            x = self._cache["sample"]._base(layer)  # [STAT_TOKENS, d]
            self._cache[key] = torch.stack([x.mean(0), x.abs().mean(0)])
        mean, mean_abs = self._cache[key]
        return mean, mean_abs

    def unnormed(self, layer: int) -> Tensor:
        """``[n, d_model]``: the residual the representation takes for ``layer``, before any norm (after its
        modifier)."""
        x = self._base(layer)
        if self.rep.modifier == "centre":
            return x - self._sample_stats(layer)[0]
        if self.rep.modifier == "nomassive":
            mean_abs = self._sample_stats(layer)[1]
            return x * (mean_abs <= MASSIVE_FACTOR * mean_abs.median())
        return x

    @torch.inference_mode()
    def layer(self, layer: int) -> Tensor:
        """``[n, d_model]`` source vectors for heads of ``layer``, in the compute dtype."""
        x = self.unnormed(layer)
        if self.rep.norm:
            x = self.weights.norm_input(layer, x)
        return x.to(self.dtype)


def source_vectors(weights: HeadWeights, token_ids: Tensor | Sequence[int], representation: str, layer: int,
                   prefix: Sequence[int] | None = None) -> Tensor:
    """``[n, d_model]`` source representations of ``token_ids`` for heads of ``layer`` (one layer's forward only)."""
    return SourceVectors(weights, token_ids, representation, layers=[layer], prefix=prefix).layer(layer)
