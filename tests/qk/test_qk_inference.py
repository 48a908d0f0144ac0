"""The QK map at inference (maps_utils.qk.inference): real attention, batched static logits, the joint prediction
against a dense naive computation, and a constructed head that attends to a chosen token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from maps_utils.dynamic.capture import Prompt, pad_batch
from maps_utils.heads import HeadWeights
from maps_utils.qk import circuit as qk
from maps_utils.qk import inference as QI
from maps_utils.static.ranks import scan_columns

from ..conftest import make_tiny

FAMILIES = ["gpt2", "llama-gqa", "gemma3-mqa", "gpt_neox-parallel", "falcon-gqa", "olmo2-gqa", "phi3-gqa"]


def _prompts(lengths=(5, 7, 4), seed=0) -> list[Prompt]:
    g = torch.Generator().manual_seed(seed)
    return [Prompt(tuple(torch.randint(0, 100, (n,), generator=g).tolist()), n - 2) for n in lengths]


@pytest.mark.parametrize("key", FAMILIES)
def test_real_attention_is_the_models_last_row_of_attention(key):
    model = make_tiny(key)
    weights = HeadWeights(model)
    prompts = _prompts()
    ids, last, _ = pad_batch(prompts, 0, "cpu")
    got = QI.real_attention(model, weights, ids, last)  # [B, L, H, T]
    for b, p in enumerate(prompts):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([p.ids]), output_attentions=True)
        for layer in range(weights.n_layers):
            want = out.attentions[layer][0, :, -1]  # [H, len]
            torch.testing.assert_close(got[b, layer, :, : len(p.ids)], want, rtol=0, atol=1e-12)
            assert (got[b, layer, :, len(p.ids):] == 0).all()


@pytest.mark.parametrize("key", FAMILIES)
def test_batched_static_logits_are_each_prompts_own(key):
    """Right-padded batches give every prompt's static logits at its own positions, -inf past its last token."""
    weights = HeadWeights(make_tiny(key))
    qmap = qk.QKMap(weights)
    prompts = _prompts()
    ids, last, _ = pad_batch(prompts, 0, "cpu")
    s, _ = QI.static_batch(qmap, ids, last, "first_mlp")
    for b, p in enumerate(prompts):
        n = len(p.ids)
        for layer in range(weights.n_layers):
            torch.testing.assert_close(s[b, layer, :, :n], qmap.prompt_logits(layer, p.ids), rtol=0, atol=1e-10)
            assert torch.isneginf(s[b, layer, :, n:]).all()


def _naive_joint_ranks(weights: HeadWeights, qmap, prompts, targets, representation: str, oracle: bool = False) -> torch.Tensor:
    """Per prompt, layer and head: softmax of the static logits (one prompt at a time; with ``oracle``, the model's
    own attention from the last position), the mixture of dense OV rows x_t W_V[g] W_O[h] U over the prompt's
    tokens, and the target's rank counted in full."""
    from maps_utils.static.sources import source_vectors

    U = weights.U
    out = torch.zeros((len(prompts), weights.n_layers, weights.n_heads), dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        if oracle:
            with torch.no_grad():
                att = weights.model(input_ids=torch.tensor([p.ids]), output_attentions=True).attentions
        for layer in range(weights.n_layers):
            a = att[layer][0, :, -1] if oracle else torch.softmax(qmap.prompt_logits(layer, p.ids), -1)  # [H, n]
            x = source_vectors(weights, list(p.ids), representation, layer)  # [n, d]
            for h in range(weights.n_heads):
                g = weights.kv_group(h)
                rows = x @ weights.W_V_kv(layer)[g] @ weights.W_O(layer)[h] @ U  # [n, V] dense
                mix = (a[h][:, None] * rows).sum(0)
                out[i, layer, h] = int((mix > mix[t]).sum())
    return out


@pytest.mark.parametrize("key", FAMILIES)
@pytest.mark.parametrize("representation", ["first_mlp", "raw+norm"])
def test_joint_prediction_equals_a_dense_naive_computation(key, representation):
    model = make_tiny(key)
    weights = HeadWeights(model)
    qmap = qk.QKMap(weights)
    prompts, targets, cap = _prompts(seed=3), [5, 17, 42], 30
    loaded = SimpleNamespace(model=model, weights=weights)
    got = QI.run_prompts(loaded, qmap, prompts, targets, ov_representation=representation, columns=scan_columns(weights),
                         rank_cap=cap, batch_size=2)
    naive = _naive_joint_ranks(weights, qmap, prompts, targets, representation).clamp(max=cap)
    assert (naive < cap).any() and (naive == cap).any()  # ranks on both sides of the cap are compared
    assert torch.equal(got["joint_rank"].long(), naive)
    oracle = _naive_joint_ranks(weights, qmap, prompts, targets, representation, oracle=True).clamp(max=cap)
    assert torch.equal(got["oracle_rank"].long(), oracle)
    assert set(got) == {"top1", "top1_no_first", "spearman", "static_on_source", "real_on_source", "joint_rank",
                        "oracle_rank"}


def _attend_to(model, weights: HeadWeights, token: int, head: int = 0, strength: float = 40.0) -> None:
    """Make head ``head`` of layer 0 attend to ``token``: its query is a constant on the lowest-frequency rotary
    pair (dims 7 and 15 of 16, which barely turn over a few positions), and its key there is the normalised
    embedding's dot product with ``token``'s own."""
    attn = weights.attn_module(0)
    d_head, g = weights.d_head, weights.kv_group(head)
    x_star = weights.input_norm(0)(weights.embed([token]))[0]  # [d]
    with torch.no_grad():
        attn.q_proj.weight[head * d_head:(head + 1) * d_head] = 0
        attn.q_proj.bias[head * d_head:(head + 1) * d_head] = 0
        attn.q_proj.bias[head * d_head + d_head // 2 - 1] = strength
        attn.k_proj.weight[g * d_head:(g + 1) * d_head] = 0
        attn.k_proj.bias[g * d_head:(g + 1) * d_head] = 0
        attn.k_proj.weight[g * d_head + d_head // 2 - 1] = x_star / x_star.norm()


def test_a_constructed_head_that_attends_to_a_chosen_token_is_found():
    model = make_tiny("qwen2-gqa")  # q/k biases, GQA, RoPE over the whole head (d_head 16)
    weights = HeadWeights(model)
    chosen = 37
    _attend_to(model, weights, chosen)
    qmap = qk.QKMap(weights)
    _, keys = qmap.salient_keys(0, [3, 11, 80], top=1)
    assert (keys[0, :, 0] == chosen).all()  # every query's best key for head 0
    assert int(qmap.attraction(progress=False)[0, 0].argmax()) == chosen
    # in a prompt, head 0 really attends to the chosen token, and the static map says so
    prompts = [Prompt((5, 9, chosen, 60, 2, 8), 2), Prompt((chosen, 14, 71, 30), 0), Prompt((20, 66, chosen, 3), 2)]
    loaded = SimpleNamespace(model=model, weights=weights)
    got = QI.run_prompts(loaded, qmap, prompts, None, ov_representation="first_mlp")
    assert (got["top1"][:, 0, 0] == 1).all()
    assert (got["real_on_source"][:, 0, 0] > 0.9).all() and (got["static_on_source"][:, 0, 0] > 0.9).all()
    ids, last, source = pad_batch(prompts, 0, "cpu")
    real = QI.real_attention(model, weights, ids, last)
    assert torch.equal(real[:, 0, 0].argmax(-1), source)


def test_agreement_measures_on_a_known_case():
    s = torch.tensor([[[[0.0, 2.0, 1.0, float("-inf")]]], [[[3.0, 1.0, 2.0, 0.0]]]])  # [B=2, L=1, H=1, T=4]
    a = torch.tensor([[[[0.5, 0.1, 0.4, 0.0]]], [[[0.7, 0.04, 0.2, 0.06]]]])
    out = QI.compare_attention(s, a, last=torch.tensor([2, 3]), source=torch.tensor([1, 2]))
    assert out["top1"].flatten().tolist() == [0.0, 1.0]
    assert out["top1_no_first"].flatten().tolist() == [0.0, 1.0]
    # ranks (0, 2, 1) against (2, 0, 1): rho = -1; (3, 1, 2, 0) against (3, 0, 2, 1): rho = 0.8
    torch.testing.assert_close(out["spearman"].flatten(), torch.tensor([-1.0, 0.8]))
    torch.testing.assert_close(out["real_on_source"].flatten(), torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(out["static_on_source"][0].flatten(), torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0)[1:2])


def test_spearman_gives_ties_their_average_rank():
    s = torch.tensor([[[[1.0, 1.0, 3.0]]]])  # a tie in the static logits
    a = torch.tensor([[[[0.2, 0.3, 0.5]]]])
    out = QI.compare_attention(s, a, last=torch.tensor([2]), source=torch.tensor([2]))
    # ranks (0.5, 0.5, 2) against (0, 1, 2): rho = 1.5 / sqrt(1.5 * 2)
    torch.testing.assert_close(out["spearman"].flatten(), torch.tensor([1.5 / (1.5 * 2) ** 0.5]))
