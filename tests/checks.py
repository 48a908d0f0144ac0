"""Exactness checks shared by the tiny-model and embedded-model tests.

Each runs the real model with hooks and compares what the adapter says with what the model did.
"""

from __future__ import annotations

import torch

from maps_utils.heads import HeadWeights


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def capture_attention(model, weights: HeadWeights, input_ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: attention input x, attention weights A, z (input of the output projection),
    the attention output, and the raw output of the value module."""
    store: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in range(weights.n_layers)}
    handles = []
    for layer in range(weights.n_layers):
        rec = store[layer]
        attn = weights.attn_module(layer)

        def attn_pre(mod, args, kwargs, rec=rec):
            rec["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

        def attn_post(mod, args, kwargs, out, rec=rec):
            rec["attn_out"] = out[0].detach()
            rec["A"] = out[1].detach()

        def z_pre(mod, args, rec=rec):
            rec["z"] = args[0].detach()

        def v_post(mod, args, out, rec=rec):
            rec["v_out"] = out.detach()

        handles += [
            attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
            attn.register_forward_hook(attn_post, with_kwargs=True),
            weights.out_proj_module(layer).register_forward_pre_hook(z_pre),
            weights.v_module(layer).register_forward_hook(v_post),
        ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return store


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def check_head_sum(model, weights: HeadWeights, input_ids, tol: float) -> None:
    """sum_h z_h W_O[h] + b_O reproduces the attention block's output."""
    store = capture_attention(model, weights, input_ids)
    for layer, rec in store.items():
        per_head = weights.ov(layer).outputs(weights.split_z(rec["z"]))  # [b, s, n_heads, d_model]
        total = per_head.sum(-2)
        if weights.b_O(layer) is not None:
            total = total + weights.b_O(layer)
        assert max_err(total, rec["attn_out"]) < tol, f"layer {layer}: head sum differs"


def check_values_and_z(model, weights: HeadWeights, input_ids, tol: float) -> None:
    """W_V (per KV group) reproduces the value module's output, and A_h · (x W_V[h] + b_V[h]) reproduces z_h."""
    store = capture_attention(model, weights, input_ids)
    for layer, rec in store.items():
        x = rec["x"]  # [b, s, d_model]
        v_kv = torch.einsum("bsd,gde->bsge", x, weights.W_V_kv(layer))
        b = weights.spec.v_bias(weights.attn_module(layer), weights.dims)
        if b is not None:
            v_kv = v_kv + b
        assert max_err(v_kv, weights.values_from_output(rec["v_out"])) < tol, f"layer {layer}: W_V_kv slice"
        v = torch.einsum("bsd,hde->bshe", x, weights.W_V(layer))  # per query head
        if weights.b_V(layer) is not None:
            v = v + weights.b_V(layer)
        z = torch.einsum("bhqk,bkhe->bqhe", rec["A"], v)
        assert max_err(z, weights.split_z(rec["z"])) < tol, f"layer {layer}: z from A·V differs"


def check_first_mlp(model, weights: HeadWeights, input_ids, tol: float) -> None:
    """With attention output zeroed, block 0 maps x to x + first_mlp(x): the adapter's MLP0 branch is the real one."""
    block, attn = weights.block(0), weights.attn_module(0)
    rec = {}

    def zero_attn(mod, args, kwargs, out):
        return (torch.zeros_like(out[0]), *out[1:])

    def block_pre(mod, args, kwargs):
        rec["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def block_post(mod, args, kwargs, out):
        rec["y"] = _first(out).detach()

    handles = [
        attn.register_forward_hook(zero_attn, with_kwargs=True),
        block.register_forward_pre_hook(block_pre, with_kwargs=True),
        block.register_forward_hook(block_post, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        assert max_err(weights.first_mlp(rec["x"]), rec["y"] - rec["x"]) < tol


def check_embed_unembed(model, weights: HeadWeights, input_ids, tol: float) -> None:
    """E rows equal the model's input embedding; x @ U (+ bias) equals the LM head."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(input_ids)
        assert max_err(weights.embed(input_ids[0]), emb[0]) < tol
        assert max_err(weights.E[input_ids[0]], emb[0]) < tol
        x = torch.randn(3, weights.d_model, dtype=weights.U.dtype)
        logits = model.get_output_embeddings()(x)
        ours = x @ weights.U + (weights.U_bias if weights.U_bias is not None else 0)
        assert max_err(ours, logits) < tol
        assert weights.U.shape == (weights.d_model, weights.vocab_size)
        # and through the full forward pass: logits = final hidden state @ U (+ bias)
        out = model(input_ids=input_ids, output_hidden_states=True)
        final = out.hidden_states[-1]
        ours = final @ weights.U + (weights.U_bias if weights.U_bias is not None else 0)
        assert max_err(ours, out.logits) < tol
