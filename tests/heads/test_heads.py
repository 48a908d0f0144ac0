"""Architecture adapters on tiny random models of every supported family (float64, exact to rounding)."""

from __future__ import annotations

import pytest
import torch
import transformers

from maps_utils import ADAPTERS, SUPPORTED_MODEL_TYPES, HeadWeights, UnsupportedArchitectureError

from ..checks import check_embed_unembed, check_first_mlp, check_head_sum, check_values_and_z
from ..conftest import FAMILY_OF, TINY_CONFIGS, make_tiny

TOL = 1e-10


def _ids(model, n=11, batch=2):
    return torch.randint(0, model.config.vocab_size, (batch, n))


def test_every_family_has_a_tiny_model():
    assert {FAMILY_OF[k] for k in TINY_CONFIGS} == {spec.family for spec in ADAPTERS}


def test_adapter_family_and_geometry(tiny):
    key, model = tiny
    weights = HeadWeights(model)
    assert weights.family == FAMILY_OF[key]
    cfg = TINY_CONFIGS[key][1]
    assert weights.n_layers == 2
    assert weights.n_heads == 4
    kv = {"falcon-mqa": 1, "falcon-gqa": 2}  # Falcon names it num_kv_heads, and multi-query does not say
    assert weights.n_kv_heads == kv.get(key, cfg.get("num_key_value_heads", 4))
    assert weights.W_V(0).shape == (4, weights.d_model, weights.d_head)
    assert weights.W_O(1).shape == (4, weights.d_head, weights.d_model)
    assert weights.W_V_kv(0).shape == (weights.n_kv_heads, weights.d_model, weights.d_head)


def test_head_outputs_sum_to_attention_output(tiny):
    _, model = tiny
    check_head_sum(model, HeadWeights(model), _ids(model), TOL)


def test_W_V_is_the_value_projection_and_reproduces_z(tiny):
    _, model = tiny
    check_values_and_z(model, HeadWeights(model), _ids(model), TOL)


def test_first_mlp_is_block0_mlp_branch(tiny):
    _, model = tiny
    check_first_mlp(model, HeadWeights(model), _ids(model), TOL)


def test_E_and_U_match_embedding_and_lm_head(tiny):
    _, model = tiny
    check_embed_unembed(model, HeadWeights(model), _ids(model, batch=2), TOL)


@pytest.mark.parametrize("key", ["llama-gqa", "qwen2-gqa", "gemma3-gqa", "phi-gqa"])
def test_gqa_head_to_group_mapping(key):
    from ..conftest import make_tiny

    model = make_tiny(key)
    weights = HeadWeights(model)
    assert weights.group_size == 2
    assert [weights.kv_group(h) for h in range(4)] == [0, 0, 1, 1]
    v_proj = weights.v_module(0).weight  # [n_kv*d_head, d_model]
    dh = weights.d_head
    for h in range(4):
        g = h // 2
        assert torch.equal(weights.W_V(0)[h], v_proj[g * dh : (g + 1) * dh].T)
    # query heads keep their own W_O
    assert not torch.equal(weights.W_O(0)[0], weights.W_O(0)[1])
    with pytest.raises(IndexError):
        weights.kv_group(4)


def test_gemma_embedding_scale_and_output_gain():
    from ..conftest import make_tiny

    weights = HeadWeights(make_tiny("gemma3-gqa"))
    assert float(weights.embed_scale) == pytest.approx(64**0.5)
    block = weights.block(1)
    assert torch.equal(weights.attn_out_gain(1), 1.0 + block.post_attention_layernorm.weight)
    for key in ("gemma-gqa", "gemma2-gqa"):
        assert HeadWeights(make_tiny(key)).embed_scale == pytest.approx(64**0.5)
    # Granite: the forward's multipliers; Gemma-2: the soft cap
    granite = HeadWeights(make_tiny("granite-gqa"))
    assert granite.embed_scale == 12.0 and torch.equal(granite.attn_out_gain(0), torch.full((64,), 0.22, dtype=torch.float64))
    assert torch.equal(granite.U, granite.model.lm_head.weight.T / 8.0)
    assert HeadWeights(make_tiny("gemma2-gqa")).logit_softcap == 30.0 and granite.logit_softcap is None
    # the other families apply no gain after the output projection
    llama = HeadWeights(make_tiny("llama-gqa"))
    assert llama.attn_out_gain(0) is None and float(llama.embed_scale) == 1.0


def test_biases_present_where_the_architecture_has_them():
    from ..conftest import make_tiny

    expect = {  # (b_V, b_O, lm-head bias)
        "gpt2": (True, True, False),
        "gpt_neox-parallel": (True, True, False),
        "phi-gqa": (True, True, True),
        "llama-gqa": (False, False, False),
        "gemma3-gqa": (False, False, False),
        "qwen2-gqa": (True, False, False),
        "gptj": (False, False, True),
        "falcon-mha-sequential": (True, True, False),
        "falcon-mqa": (False, False, False),
        "stablelm-parallel": (True, False, False),
        "phi3-gqa": (False, False, False),
    }
    for key, (bv, bo, bu) in expect.items():
        weights = HeadWeights(make_tiny(key))
        got = (weights.b_V(0) is not None, weights.b_O(0) is not None, weights.U_bias is not None)
        assert got == (bv, bo, bu), key


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=50)  # no Llama-like layout
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError) as err:
        HeadWeights(model)
    msg = str(err.value)
    assert "bloom" in msg and "\n" not in msg
    for t in SUPPORTED_MODEL_TYPES:
        assert t in msg


def _renamed(key: str, model_type: str):
    model = make_tiny(key)
    model.config.model_type = model_type  # an architecture the table does not list
    return model


def test_generic_adapter_reads_an_unlisted_llama_like_model():
    model = _renamed("llama-gqa", "my_llama")
    weights = HeadWeights(model)
    assert weights.family == "generic" and weights.n_kv_heads == 2
    ids = _ids(model, batch=2)
    check_head_sum(model, weights, ids, TOL)
    check_values_and_z(model, weights, ids, TOL)
    check_first_mlp(model, weights, ids, TOL)
    check_embed_unembed(model, weights, ids, TOL)
    reference = HeadWeights(make_tiny("llama-gqa"))
    assert torch.equal(weights.W_V(1), reference.W_V(1)) and torch.equal(weights.W_O(1), reference.W_O(1))


@pytest.mark.parametrize(("key", "what"), [("granite-gqa", "first_mlp"), ("cohere-gqa", "logits")])
def test_generic_adapter_refuses_a_model_it_does_not_reproduce(key, what):
    """Granite's residual multiplier and Cohere's logit scale break the Llama-like reading: the parity check names
    the first mismatch in one sentence; a model without the layout (OLMo-2: no input norm) is refused before it."""
    with pytest.raises(UnsupportedArchitectureError) as err:
        HeadWeights(_renamed(key, "unlisted"))
    msg = str(err.value)
    assert "'unlisted' is not in the adapter table" in msg and what in msg and "\n" not in msg
    with pytest.raises(UnsupportedArchitectureError, match="do not follow the Llama-like layout"):
        HeadWeights(_renamed("olmo2-gqa", "unlisted"))



def test_ov_norms_equal_dense_frobenius(tiny):
    _, model = tiny
    weights = HeadWeights(model)
    for layer in range(weights.n_layers):
        dense = torch.stack([torch.linalg.matrix_norm(weights.W_V(layer)[h] @ weights.W_O(layer)[h]) for h in range(4)])
        assert torch.allclose(weights.ov(layer).frobenius_norms(), dense, rtol=1e-10)
