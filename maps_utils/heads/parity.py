"""Parity checks: an adapter against the model's own forward pass.

Each check runs the real model with hooks and compares what the adapter says with what the model did, returning
``None`` when they agree within ``tol`` (relative to the larger side) or one sentence saying what differs. The test
suite runs them on every family; :func:`check_generic` runs them all on a model the table does not list before the
generic adapter may read it (:class:`~.head_weights.HeadWeights` calls it once per model).

``weights`` below is the model's :class:`~.head_weights.HeadWeights` (not imported here: it calls these checks).
"""

from __future__ import annotations

import logging
import weakref

import torch

from ..core.errors import UnsupportedArchitectureError

# relative tolerance per compute dtype: exact to rounding
_passed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # models the generic adapter reads
log = logging.getLogger(__name__)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _hidden(args, kwargs):
    return (args[0] if args else kwargs["hidden_states"]).detach()


def _run_hooked(model, handles: list, input_ids: torch.Tensor) -> None:
    """One forward pass with ``handles`` installed; they are removed however it ends."""
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def capture_attention(model, weights, input_ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: attention input x, attention weights A (None unless the implementation returns them), z (input
    of the output projection), the attention output, and the raw output of the value module; all on the adapter's
    device (where a device map runs the layer elsewhere, its tensors are copied there)."""
    store: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in range(weights.n_layers)}
    handles, dev = [], weights.device
    for layer in range(weights.n_layers):
        rec = store[layer]

        def attn_pre(mod, args, kwargs, rec=rec):
            rec["x"] = _hidden(args, kwargs).to(dev)

        def attn_post(mod, args, kwargs, out, rec=rec):
            rec["attn_out"] = out[0].detach().to(dev)
            rec["A"] = out[1].detach().to(dev) if len(out) > 1 and isinstance(out[1], torch.Tensor) else None

        handles += [
            weights.attn_module(layer).register_forward_pre_hook(attn_pre, with_kwargs=True),
            weights.attn_module(layer).register_forward_hook(attn_post, with_kwargs=True),
            weights.out_proj_module(layer).register_forward_pre_hook(
                lambda mod, args, rec=rec: rec.__setitem__("z", args[0].detach().to(dev))),
            weights.v_module(layer).register_forward_hook(
                lambda mod, args, out, rec=rec: rec.__setitem__("v_out", out.detach().to(dev))),
        ]
    _run_hooked(model, handles, input_ids)
    return store


def head_sum(model, weights, input_ids, tol: float) -> str | None:
    """sum_h z_h W_O[h] + b_O reproduces the attention block's output."""
    for layer, rec in capture_attention(model, weights, input_ids).items():
        total = weights.ov(layer).outputs(weights.split_z(rec["z"])).sum(-2)  # [b, s, d_model]
        if weights.b_O(layer) is not None:
            total = total + weights.b_O(layer)
        if (err := max_err(total, rec["attn_out"])) >= tol:
            return f"the heads' outputs do not sum to the attention output at layer {layer} (relative error {err:.2g})"
    return None


def values_and_z(model, weights, input_ids, tol: float) -> str | None:
    """W_V (per KV group) reproduces the value module's output, and A_h · (x W_V[h] + b_V[h]) reproduces z_h."""
    for layer, rec in capture_attention(model, weights, input_ids).items():
        x = rec["x"]  # [b, s, d_model]
        v_kv = torch.einsum("bsd,gde->bsge", x, weights.W_V_kv(layer))
        with weights.reading(weights.v_module(layer)):  # an offloaded value projection is loaded for the read
            b = weights.spec.v_bias(weights.attn_module(layer), weights.dims)
        if b is not None:
            v_kv = v_kv + b.to(v_kv.device)
        if (err := max_err(v_kv, weights.values_from_output(rec["v_out"]))) >= tol:
            return f"W_V does not reproduce the value projection at layer {layer} (relative error {err:.2g})"
        if rec["A"] is None:
            continue  # the attention implementation returns no weights: the value check above stands alone
        v = torch.einsum("bsd,hde->bshe", x, weights.W_V(layer))  # per query head
        if weights.b_V(layer) is not None:
            v = v + weights.b_V(layer)
        z = torch.einsum("bhqk,bkhe->bqhe", rec["A"], v)
        if (err := max_err(z, weights.split_z(rec["z"]))) >= tol:
            return f"the attention-weighted values do not give z at layer {layer} (relative error {err:.2g})"
    return None


def first_mlp(model, weights, input_ids, tol: float) -> str | None:
    """With attention output zeroed, block 0 maps x to x + first_mlp(x): the adapter's MLP0 branch is the real one."""
    block, rec = weights.block(0), {}
    handles = [
        weights.attn_module(0).register_forward_hook(
            lambda mod, args, kwargs, out: (torch.zeros_like(out[0]), *out[1:]), with_kwargs=True),
        block.register_forward_pre_hook(
            lambda mod, args, kwargs: rec.__setitem__("x", _hidden(args, kwargs).to(weights.device)), with_kwargs=True),
        block.register_forward_hook(
            lambda mod, args, kwargs, out: rec.__setitem__("y", _first(out).detach().to(weights.device)),
            with_kwargs=True),
    ]
    _run_hooked(model, handles, input_ids)
    with torch.no_grad():
        err = max_err(weights.first_mlp(rec["x"]), rec["y"] - rec["x"])
    return None if err < tol else f"first_mlp is not block 0's MLP branch (relative error {err:.2g})"


def embed_unembed(model, weights, input_ids, tol: float) -> str | None:
    """E reproduces what enters block 0 (differences of two sequences, so additive position embeddings cancel),
    and the final hidden state times U (+ bias, through the soft cap) reproduces the logits."""
    if input_ids.shape[0] < 2:
        raise ValueError("embed_unembed needs a batch of at least two sequences")
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
        entering = out.hidden_states[0]  # [b, s, d]
        ours = weights.embed(input_ids[0]) - weights.embed(input_ids[1])
        if (err := max_err(ours, entering[0] - entering[1])) >= tol:
            return f"E does not reproduce the residual entering block 0 (relative error {err:.2g})"
        if (err := max_err(weights.E[input_ids[0]], weights.embed(input_ids[0]))) >= tol:
            return f"E's rows differ from embed() (relative error {err:.2g})"
        logits = out.hidden_states[-1] @ weights.U + (weights.U_bias if weights.U_bias is not None else 0)
        cap = weights.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if (err := max_err(logits, out.logits)) >= tol:
            return f"the final hidden state times U does not reproduce the logits (relative error {err:.2g})"
    if weights.U.shape != (weights.d_model, weights.vocab_size):
        return f"U has shape {tuple(weights.U.shape)}, not (d_model, vocab)"
    return None


CHECKS = (head_sum, values_and_z, first_mlp, embed_unembed)


def mismatches(model, weights, input_ids: torch.Tensor | None = None,
               tol: float | None = None) -> list[str]:
    """Every check's sentence where the adapter and the model disagree (empty: they agree), on ``input_ids``
    (default: two seeded random sequences of 8 tokens)."""
    if input_ids is None:
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, weights.vocab_size, (2, 8), generator=g).to(weights.device)
    tol = tol if tol is not None else TOLERANCE.get(weights.dtype, 1e-4)
    was_training = model.training
    model.eval()
    try:
        return [msg for check in CHECKS if (msg := check(model, weights, input_ids, tol)) is not None]
    finally:
        model.train(was_training)


def reading_raised(err: Exception) -> str:
    """A check's sentence for an adapter that fitted the model by name but not by shape or call."""
    return f"reading it raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def not_reproduced(model, problem: str) -> UnsupportedArchitectureError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return UnsupportedArchitectureError(
        f"Architecture '{model_type}' is not in the adapter table and the generic adapter does not reproduce "
        f"it: {problem}; add an ArchSpec for it in maps_utils/heads/.")


def check_generic(model, weights) -> None:
    """Refuse, in one sentence, an unlisted model that the generic adapter does not reproduce (every check of
    :data:`CHECKS`); once it passes, log that it is read generically and do not check it again."""
    if model in _passed:
        return
    try:
        problems = mismatches(model, weights)
    except Exception as err:  # the layout fitted by name but not by shape or call
        problems = [reading_raised(err)]
    if problems:
        raise not_reproduced(model, problems[0])
    log.warning("Architecture '%s' is read by the generic Llama-like adapter (it passed the parity checks).",
                getattr(model.config, "model_type", None))
    _passed[model] = True
