"""The static QK map (maps_utils.qk.circuit) against the models' own attention, on tiny random models of every family."""

from __future__ import annotations

import sys

import pytest
import torch

from maps_utils.core.errors import OptionError
from maps_utils.heads import HeadWeights
from maps_utils.qk import circuit as qk

from ..conftest import _BASE, _GQA, TINY_CONFIGS, make_tiny

# variants whose query/key side differs from the family's default configuration
QK_CONFIGS = {
    "phi-qknorm": ("PhiConfig", dict(_GQA, partial_rotary_factor=0.5, qk_layernorm=True)),
    "stablelm-qknorm": ("StableLmConfig", dict(_GQA, qk_layernorm=True, partial_rotary_factor=0.5)),
    "cohere-qknorm": ("CohereConfig", dict(_BASE, num_key_value_heads=4, use_qk_norm=True)),
    "gpt2-layerscale": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                                           scale_attn_by_inverse_layer_idx=True)),
    "qwen2-bias": ("Qwen2Config", dict(_GQA)),  # q/k biases
}
ALL = list(TINY_CONFIGS) + list(QK_CONFIGS)


@pytest.fixture(params=ALL)
def any_tiny(request):
    key = request.param
    if key in QK_CONFIGS:
        TINY_CONFIGS[key] = QK_CONFIGS[key]
        try:
            return key, make_tiny(key)
        finally:
            del TINY_CONFIGS[key]
    return key, make_tiny(key)


def _model_logits(model, weights: HeadWeights, layer: int, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's own attention logits ``[H, T, T]`` (before mask and softmax) at ``layer`` when its residual input
    is ``x`` (+ learned positions) for ``ids``: the query and key states the attention module passes to its eager
    attention function (the softmax may run in float32, so its weights would not be float64-exact), times the scaling
    and through the soft cap it passes. Falcon calls no such function and softmaxes in the model's dtype: there the
    log of its attention weights stands in (equal up to a constant per query, which the comparison removes)."""
    resid = x.clone()
    pos = weights.position_rows(torch.arange(len(ids)))
    if pos is not None:
        resid = resid + pos
    module = sys.modules[type(weights.attn_module(layer)).__module__]
    seen = {}

    def eager(mod, query, key, value, attention_mask, *args, scaling=None, softcap=None, **kwargs):
        if getattr(mod, "layer_idx", None) == layer:
            k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            s = query @ k.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
            seen["s"] = s[0] if softcap is None else torch.tanh(s[0] / softcap) * softcap
        return original(mod, query, key, value, attention_mask, *args, scaling=scaling, softcap=softcap, **kwargs)

    def swap(mod, args, kwargs):
        if args:
            return (resid[None], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": resid[None]}

    original = getattr(module, "eager_attention_forward", None)
    handle = weights.block(layer).register_forward_pre_hook(swap, with_kwargs=True)
    if original is not None:
        module.eager_attention_forward = eager
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], output_attentions=True)
    finally:
        handle.remove()
        if original is not None:
            module.eager_attention_forward = original
    if original is None:
        return out.attentions[layer][0].log()
    return seen["s"]


def test_static_qk_logits_are_the_models_own_at_every_position(any_tiny):
    """s(q, k) from the parameters equals the model's pre-softmax logit (up to the softmax's per-row constant) for
    every query and key position of a prompt, in every layer: norms, biases, RoPE (half, partial, interleaved),
    learned positions, q/k norms, GQA, scale and soft cap all as the model applies them."""
    key, model = any_tiny
    weights = HeadWeights(model)
    ids = torch.randint(0, 100, (7,), generator=torch.Generator().manual_seed(1))
    qmap = qk.QKMap(weights)
    for layer in range(weights.n_layers):
        xs = qmap.vectors(ids, [layer])
        log_a = _model_logits(model, weights, layer, ids, xs.unnormed(layer))  # [H, T, T]
        for query in (2, len(ids) - 1):
            ours = qmap.prompt_logits(layer, ids.tolist(), query=query, xs=xs)[:, : query + 1]  # [H, q+1]
            theirs = log_a[:, query, : query + 1]
            torch.testing.assert_close(ours - ours[:, :1], theirs - theirs[:, :1], rtol=0, atol=1e-9,
                                       msg=lambda m, where=f"{key} layer {layer} query {query}": f"{where}: {m}")


def test_offset_scores_are_the_prompt_logits_at_that_offset(any_tiny):
    """QKMap.scores at one offset is the logit of a query that many positions after a key at key_position; with
    several offsets it is their mean."""
    key, model = any_tiny
    weights = HeadWeights(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (6,), generator=g).tolist()
    for layer in range(weights.n_layers):
        per_offset = []
        for offset in (1, 3):
            qmap = qk.QKMap(weights, qk.QKOptions(offsets=(offset,), key_position=1))
            prompt = ids[: 1 + offset] + [ids[-1]]  # key ids[1] at position 1, query ids[-1] at 1 + offset
            expected = qmap.prompt_logits(layer, prompt)[:, 1]
            got = qmap.scores(layer, [ids[-1]], [ids[1]])[:, 0, 0]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
            per_offset.append(got)
        both = qk.QKMap(weights, qk.QKOptions(offsets=(1, 3), key_position=1)).scores(layer, [ids[-1]], [ids[1]])
        torch.testing.assert_close(both[:, 0, 0], torch.stack(per_offset).mean(0), rtol=0, atol=1e-10)


def test_salient_keys_are_the_dense_top_keys(any_tiny):
    """The chunked vocabulary readout equals a dense argsort of the scores against every token."""
    key, model = any_tiny
    weights = HeadWeights(model)
    qmap = qk.QKMap(weights)
    V = weights.vocab_size
    for layer in range(weights.n_layers):
        values, ids = qmap.salient_keys(layer, [3, 50], top=5, chunk=17)
        dense = qmap.scores(layer, [3, 50], list(range(V)))  # [H, 2, V]
        top_v, _ = dense.topk(5, dim=-1)
        torch.testing.assert_close(values, top_v, rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.gather(dense, -1, ids), values, rtol=0, atol=1e-10)


def test_qk_saliency_is_the_mean_querys_logit(any_tiny):
    key, model = any_tiny
    weights = HeadWeights(model)
    qmap = qk.QKMap(weights, qk.QKOptions(offsets=(1, 2)))
    sal = qmap.attraction(chunk=40, progress=False)
    V = weights.vocab_size
    sample = torch.linspace(0, V - 1, min(4096, V)).round().long().unique()
    for layer in range(weights.n_layers):
        q = qmap.queries(layer, qmap.vectors(sample, [layer])).mean((0, 1))[None]
        k = qmap.keys(layer, qmap.vectors(torch.arange(V), [layer]))
        expected = qk.logits(weights, layer, q, k)[:, 0]
        torch.testing.assert_close(sal[layer], expected.float(), rtol=1e-6, atol=1e-6)


def test_bad_options_get_one_sentence():
    model = make_tiny("llama-gqa")
    weights = HeadWeights(model)
    with pytest.raises(OptionError, match="drop '\\+norm'"):
        qk.QKMap(weights, qk.QKOptions(representation="raw+norm"))
    with pytest.raises(OptionError, match="whole numbers"):
        qk.QKMap(weights, qk.QKOptions(offsets=()))
    with pytest.raises(OptionError, match="learned positions 0..63"):  # GPT-2's table has 64 rows
        qk.QKMap(HeadWeights(make_tiny("gpt2")), qk.QKOptions(key_position=60, offsets=(1, 4)))
    TINY_CONFIGS["falcon-alibi"] = ("FalconConfig", dict(_BASE, ffn_hidden_size=96, alibi=True))
    try:
        falcon = make_tiny("falcon-alibi")
    finally:
        del TINY_CONFIGS["falcon-alibi"]
    with pytest.raises(OptionError, match="ALiBi"):
        qk.QKMap(HeadWeights(falcon))


def _renamed(key: str, model_type: str, **config):
    TINY_CONFIGS["_renamed"] = (TINY_CONFIGS[key][0], {**TINY_CONFIGS[key][1], **config})
    try:
        model = make_tiny("_renamed")
    finally:
        del TINY_CONFIGS["_renamed"]
    model.config.model_type = model_type  # an architecture the adapter table does not list
    return model


@pytest.mark.parametrize("key", ["llama-gqa", "qwen3-gqa", "gemma-gqa"])
def test_the_generic_adapter_reads_queries_and_keys_once_they_reproduce_the_model(key):
    weights = HeadWeights(_renamed(key, "unlisted"))
    assert weights.family == "generic"
    listed = HeadWeights(make_tiny(key))
    for layer in range(2):
        ours = qk.QKMap(weights).scores(layer, [3, 9], [4, 50, 70])
        torch.testing.assert_close(ours, qk.QKMap(listed).scores(layer, [3, 9], [4, 50, 70]), rtol=0, atol=0)


def test_the_generic_adapter_refuses_a_qk_map_it_does_not_reproduce():
    """Cohere with logit_scale 1 passes the OV parity checks as a generic model, but rotates its queries and keys in
    interleaved pairs, which the generic (Llama-like) reading does not: one sentence, no traceback."""
    from maps_utils.core.errors import UnsupportedArchitectureError

    weights = HeadWeights(_renamed("cohere-gqa", "unlisted", logit_scale=1.0))
    assert weights.family == "generic"
    with pytest.raises(UnsupportedArchitectureError) as err:
        qk.QKMap(weights)
    msg = str(err.value)
    assert "static QK map does not reproduce unlisted's attention" in msg and "logits differ" in msg
    assert "\n" not in msg
