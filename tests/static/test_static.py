"""The static engine against a deliberately naive dense implementation, and its arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maps_utils import HeadWeights
from maps_utils import static as ST
from maps_utils.static import sources as SRC

from ..conftest import TINY_CONFIGS, make_tiny


# ---- the naive reference: explicit d×d W_VO per head, full-vocabulary rows, torch.topk ------------------
def dense_rows(weights: HeadWeights, layer: int, head: int, x: torch.Tensor) -> torch.Tensor:
    w_vo = weights.W_V(layer)[head] @ weights.W_O(layer)[head]  # [d, d]
    return (x @ w_vo) @ weights.U  # [n, V]


def dense_ranks(rows: torch.Tensor, targets: torch.Tensor, cap: int):
    own = rows.gather(1, targets[:, None])
    other = torch.ones_like(rows, dtype=torch.bool).scatter_(1, targets[:, None], False)
    top = ((rows > own) & other).sum(1).clamp(max=cap)
    bottom = ((rows < own) & other).sum(1).clamp(max=cap)
    return top, bottom


def dense_topk_hits(rows: torch.Tensor, targets: torch.Tensor, k: int, suppression: bool = False):
    idx = torch.topk(-rows if suppression else rows, k, dim=1).indices
    return (idx == targets[:, None]).any(1)


def check_against_dense(weights, src, tgt, representation, cap, **kw):
    res = ST.target_ranks(weights, src, tgt, representation=representation, rank_cap=cap, progress=False, **kw)
    for layer in range(weights.n_layers):
        x = SRC.source_vectors(weights, src, representation, layer).to(weights.U.dtype)
        for h in range(weights.n_heads):
            rows = dense_rows(weights, layer, h, x)
            top, bottom = dense_ranks(rows, torch.as_tensor(tgt), cap)
            assert torch.equal(res.top[layer, h].long(), top), (layer, h)
            assert torch.equal(res.bottom[layer, h].long(), bottom), (layer, h)
            for k in (1, min(3, cap)):  # scores agree with the topk definition (no ties in float64)
                assert torch.equal(res.hits(k)[layer, h], dense_topk_hits(rows, torch.as_tensor(tgt), k))
                assert torch.equal(res.hits(k, True)[layer, h], dense_topk_hits(rows, torch.as_tensor(tgt), k, True))
    return res


def _pairs(vocab: int, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist(), torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
@pytest.mark.parametrize("compute_space", ["auto", "head", "model"])
def test_factored_equals_dense_on_every_family(key, compute_space):
    """The paper's representations and a forward-pass one on every family."""
    weights = HeadWeights(make_tiny(key))
    src, tgt = _pairs(weights.vocab_size)
    for representation in ("first_mlp", "raw", "first_mlp_all", "block0+norm", "context_free_1"):
        check_against_dense(weights, src, tgt, representation, cap=weights.vocab_size, compute_space=compute_space)  # full ranks
        check_against_dense(weights, src, tgt, representation, cap=7, compute_space=compute_space)  # capped ranks


@pytest.mark.parametrize("key", ["gpt2", "gpt_neox-parallel", "llama-gqa", "gemma3-mqa", "olmo2-gqa", "falcon-mqa"])
@pytest.mark.parametrize("compute_space", ["head", "model"])
def test_factored_equals_dense_for_every_representation(key, compute_space):
    """Every named representation, on families that differ in their norms, fused weights and KV sharing."""
    weights = HeadWeights(make_tiny(key))
    src, tgt = _pairs(weights.vocab_size)
    for representation in SRC.names(depths=(1,), modifiers=SRC.MODIFIERS):
        check_against_dense(weights, src, tgt, representation, cap=weights.vocab_size, compute_space=compute_space)
        check_against_dense(weights, src, tgt, representation, cap=7, compute_space=compute_space)


def test_chunking_and_memory_budget_do_not_change_results():
    weights = HeadWeights(make_tiny("llama-gqa"))
    src, tgt = _pairs(weights.vocab_size, n=60)
    ref = ST.target_ranks(weights, src, tgt, rank_cap=20, progress=False)
    for budget in (1e-4, 0.01, 64):  # from a handful of entries per block to everything at once
        for compute_space in ("auto", "head", "model"):
            res = ST.target_ranks(weights, src, tgt, rank_cap=20, memory_budget_mb=budget, compute_space=compute_space, progress=False)
            assert torch.equal(res.top, ref.top) and torch.equal(res.bottom, ref.bottom)
    order = ST.Columns(weights.U, torch.arange(weights.vocab_size), torch.arange(weights.vocab_size))  # unshuffled order
    w = ST.head_rows(weights, 1, SRC.source_vectors(weights, src, "first_mlp", 1))[2]
    top, bottom = ST.ranks_of_targets(w, torch.tensor(tgt), order, rank_cap=20, first_chunk=3, growth=1.1)
    assert torch.equal(top, ref.top[1, 2].long()) and torch.equal(bottom, ref.bottom[1, 2].long())


def test_head_space_blocks_have_the_bits_of_the_whole_product():
    """Head space computes W_O[h] U block by block, only for the columns its rows still scan, with the bits of the
    whole product (a one-column block is computed two wide); the ranks equal model space's and the dense rows'."""
    from maps_utils.static import ranks as S

    weights = HeadWeights(make_tiny("llama-gqa"))
    src, tgt = _pairs(weights.vocab_size, n=60)
    x = SRC.source_vectors(weights, src, "first_mlp", 1)
    columns = ST.scan_columns(weights)
    head = S.head_ranks(weights.ov(1), x, torch.tensor(tgt), columns, rank_cap=5, compute_space="head")
    model = S.head_ranks(weights.ov(1), x, torch.tensor(tgt), columns, rank_cap=5, compute_space="model")
    for h in range(weights.n_heads):
        top, bottom = dense_ranks(dense_rows(weights, 1, h, x), torch.tensor(tgt), 5)
        assert torch.equal(head[0][h], top) and torch.equal(head[1][h], bottom), h
        assert torch.equal(model[0][h], top) and torch.equal(model[1][h], bottom), h
    w_o = weights.ov(1).W_O[0]
    full = w_o @ columns.cols
    for block in (slice(7, 8), slice(7, 30)):
        wide = S._wide(w_o, columns.cols[:, block])
        two = slice(block.start, max(block.stop, block.start + 2))
        if torch.equal(w_o @ columns.cols[:, two], full[:, two]):  # this BLAS keeps a column's bits in any width
            assert torch.equal(wide, full[:, block]), block
        else:  # it does not (MKL on the AMD EPYC here, 2026-12-01): the ranks above still agree
            torch.testing.assert_close(wide, full[:, block], rtol=1e-12, atol=1e-12)
    assert S.pick_space("auto", 576, 64, 1441) == "head" and S.pick_space("auto", 576, 64, 1440) == "model"
    assert S.pick_space("auto", 640, 256, 10**6) == "model"  # d_head > d_model / 4: never


def test_scan_columns_are_reused_and_rebuilt_after_an_in_place_edit():
    """The unembedding in scan order is built once per weights and dtype; editing the weights in place rebuilds it,
    so the ranks follow the new weights (no stale copy)."""
    model = make_tiny("llama-mha-untied")
    weights = HeadWeights(model)
    first = ST.scan_columns(weights)
    assert ST.scan_columns(weights) is first
    assert torch.equal(first.cols, weights.U[:, first.perm])
    src, tgt = _pairs(weights.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # every entry of M flips sign: top and bottom ranks swap
    rebuilt = ST.scan_columns(weights)
    assert rebuilt is not first and torch.equal(rebuilt.cols, -first.cols)
    check_against_dense(weights, src, tgt, "first_mlp", cap=7)


def test_gqa_heads_use_their_groups_value_projection():
    """Built from the raw v_proj / o_proj weights, not through the adapter."""
    model = make_tiny("llama-gqa")
    weights = HeadWeights(model)
    attn = model.model.layers[1].self_attn
    dh = weights.d_head
    src, tgt = _pairs(weights.vocab_size)
    res = ST.target_ranks(weights, src, tgt, rank_cap=weights.vocab_size, progress=False)
    x = SRC.source_vectors(weights, src, "first_mlp", 1)
    for h in range(4):
        g = h // 2
        w_v = attn.v_proj.weight[g * dh : (g + 1) * dh].T  # [d, dh]
        w_o = attn.o_proj.weight[:, h * dh : (h + 1) * dh].T  # [dh, d]
        rows = x @ w_v @ w_o @ model.lm_head.weight.T
        top, _ = dense_ranks(rows, torch.tensor(tgt), weights.vocab_size)
        assert torch.equal(res.top[1, h].long(), top)


# ---- constructed heads: arguments change results the expected way -------------------------------------
def _identity_model(sign: float = 1.0):
    """A tiny Llama whose head 0 in every layer has W_V W_O = sign * I and whose E = U^T has unit rows."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=32, vocab_size=60, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        emb = model.model.embed_tokens.weight
        emb /= emb.norm(dim=1, keepdim=True)
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[:16] = torch.eye(16, dtype=torch.float64)
            layer.self_attn.o_proj.weight[:, :16] = sign * torch.eye(16, dtype=torch.float64)
    return HeadWeights(model)


def test_identity_head_copies_and_negated_head_suppresses():
    ids = list(range(60))
    res = ST.target_ranks(_identity_model(+1), ids, ids, representation="raw", rank_cap=10, progress=False)
    assert res.scores(1)[:, 0].tolist() == [1.0, 1.0]  # M = E E^T: every token is its own top-1
    assert res.scores(1, suppression=True)[:, 0].tolist() == [0.0, 0.0]
    neg = ST.target_ranks(_identity_model(-1), ids, ids, representation="raw", rank_cap=10, progress=False)
    assert neg.scores(1)[:, 0].tolist() == [0.0, 0.0]
    assert neg.scores(1, suppression=True)[:, 0].tolist() == [1.0, 1.0]


def test_representation_and_k_change_results_as_expected():
    weights = _identity_model(+1)
    ids = list(range(60))
    raw = ST.target_ranks(weights, ids, ids, representation="raw", rank_cap=60, progress=False)
    mlp = ST.target_ranks(weights, ids, ids, representation="first_mlp", rank_cap=60, progress=False)
    mlp_all = ST.target_ranks(weights, ids, ids, representation="first_mlp_all", rank_cap=60, progress=False)
    assert torch.equal(mlp.top[0], raw.top[0])  # the paper's representation keeps raw E for layer 0 ...
    assert not torch.equal(mlp.top[1], raw.top[1])  # ... and reads MLP0(E) from layer 1 on
    assert torch.equal(mlp_all.top[1], mlp.top[1]) and not torch.equal(mlp_all.top[0], raw.top[0])
    scores = [mlp.scores(k)[1, 0].item() for k in (1, 5, 20, 60)]
    assert scores == sorted(scores) and scores[-1] == 1.0  # larger k never lowers a score; k = V always hits
    with pytest.raises(ValueError, match="exceeds rank_cap"):
        mlp.scores(61)
    with pytest.raises(ValueError, match="Unknown source representation"):
        ST.target_ranks(weights, ids, ids, representation="mlp", progress=False)


# ---- top mappings and saliency -------------------------------------------------------------------------------
def test_top_mappings_equal_dense_topk():
    weights = HeadWeights(make_tiny("gemma3-gqa"))
    src, _ = _pairs(weights.vocab_size, n=9)
    for suppression in (False, True):
        v, i = ST.top_mappings(weights, 1, 3, src, k=5, suppression=suppression, chunk=13)
        rows = dense_rows(weights, 1, 3, SRC.source_vectors(weights, src, "first_mlp", 1))
        dv, di = torch.topk(-rows if suppression else rows, 5, dim=1)
        assert torch.equal(i, di) and torch.allclose(v, dv)


@pytest.mark.parametrize("representation", ["first_mlp_all", "raw+norm", "context_free"])
@pytest.mark.parametrize("key", ["gpt2", "phi-gqa", "gemma3-mqa"])
def test_saliency_is_norm_amplification(key, representation):
    weights = HeadWeights(make_tiny(key))
    sal = ST.saliency(weights, representation=representation, chunk=17, progress=False, dtype=torch.float64)
    ids = torch.arange(weights.vocab_size)
    for layer in range(weights.n_layers):
        x = SRC.source_vectors(weights, ids, representation, layer)
        for h in range(weights.n_heads):
            w_vo = weights.W_V(layer)[h] @ weights.W_O(layer)[h]
            expected = (x @ w_vo).norm(dim=1) / x.norm(dim=1)
            assert torch.allclose(sal[layer, h].double(), expected, rtol=1e-5)


# ---- the embedded models: a sample of heads, float64, identical ranks ---------------------------------
@pytest.mark.embedded
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_engine_equals_dense_on_embedded_sample(which, request):
    """Every source representation; one head per sampled layer (the engine ranks all of the layer's heads)."""
    from maps_utils import relations as R

    loaded = request.getfixturevalue(which)
    weights = loaded.weights
    rel = R.filter_single_token(R.load("country_capital"), loaded.tokenizer)
    src, tgt = rel.source_ids[:30], rel.target_ids[:30]
    layers = [1, weights.n_layers - 1]
    for representation in SRC.names(depths=(2,)) + ["raw_mlp+centre", "block0+nomassive+norm"]:
        res = ST.target_ranks(weights, src, tgt, representation=representation, rank_cap=50, layers=layers, dtype=torch.float64,
                             progress=False)
        for layer in layers:
            h = layer % weights.n_heads
            x = SRC.source_vectors(weights, src, representation, layer).double()
            w_vo = weights.W_V(layer)[h].double() @ weights.W_O(layer)[h].double()
            rows = (x @ w_vo) @ weights.U.double()
            top, bottom = dense_ranks(rows, torch.tensor(tgt), 50)
            assert torch.equal(res.top[layer, h].long(), top), (representation, layer, h)
            assert torch.equal(res.bottom[layer, h].long(), bottom), (representation, layer, h)


def test_salient_operations_match_dense():
    weights = HeadWeights(make_tiny("qwen2-gqa"))
    ops = ST.salient_operations(weights, n_tokens=4, n_mappings=3, heads_subset=[(1, 2)], progress=False)
    ids = torch.arange(weights.vocab_size)
    x = SRC.source_vectors(weights, ids, "first_mlp_all", 1)
    w_vo = weights.W_V(1)[2] @ weights.W_O(1)[2]
    amp = (x @ w_vo).norm(dim=1) / x.norm(dim=1)
    top = torch.topk(amp, 4).indices
    assert ops.token_id.tolist() == top.tolist() and ops["rank"].tolist() == [0, 1, 2, 3]
    expected = torch.topk((x[top] @ w_vo) @ weights.U, 3, dim=1).indices
    assert ops.mapping_ids.tolist() == expected.tolist()


# ---- bit-identity: the engine's float32 ranks on the embedded models, as recorded before a speed-up -----------
def _digest(res) -> str:
    import hashlib

    m = hashlib.sha256()
    for ranks in (res.top, res.bottom):
        m.update(ranks.contiguous().numpy().tobytes())
    return m.hexdigest()[:16]


def cpu_kind() -> str:
    """The CPU's vendor and the kernels torch picks for it: float32 matmul bits differ between kinds (the same code
    gave other ranks on an AMD EPYC than on the Intel Xeons these were first recorded on)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "unknown")
    return f"{vendor}/{torch.backends.cpu.get_cpu_capability()}"


# (model fixture, representation, relation or "all", compute space) -> sha256 prefix of the int16 top and bottom ranks
# [L, H, n], recorded with the engine at 6c3a150 (before issue 21's changes) on the shipped relation files, on an
# Intel Xeon (AVX-512). A change to the relation data changes them; a change to the engine must not.
RECORDED = {
    ("smollm2", "first_mlp", "country_capital", "auto"): "8274f760ae569050",
    ("smollm2", "first_mlp", "copying", "auto"): "e84e60757603001d",
    ("smollm2", "first_mlp", "all", "auto"): "504c1d5a2ddf2461",  # head space: 3,340 pairs
    ("smollm2", "raw", "country_capital", "auto"): "5a25adae534e9ce2",
    ("gemma3", "first_mlp", "country_capital", "auto"): "82e0fefdc98787a3",
    ("gemma3", "first_mlp", "copying", "auto"): "5bb309a5b625b04e",
    ("gemma3", "raw", "country_capital", "auto"): "55a77c6150d69ee4",
}
# Where another CPU kind gives other bits: recorded there with the engine at 927f0fb, whose tables on the Intel Xeon
# still had the digests above (AMD EPYC, 2026-12-01; the other cases have the same bits on both).
RECORDED_ELSEWHERE = {
    ("smollm2", "first_mlp", "copying", "auto"): {"AuthenticAMD/AVX512": "4945ca68a05e2336"},
    ("smollm2", "first_mlp", "all", "auto"): {"AuthenticAMD/AVX512": "176f7b99056ccebe"},
}
RECORDED_KINDS = ("GenuineIntel/AVX512", "AuthenticAMD/AVX512")


@pytest.mark.embedded
@pytest.mark.parametrize("case", list(RECORDED), ids=lambda c: "-".join(c))
def test_float32_ranks_are_bit_identical_to_the_recorded_ones(case, request):
    """Speed-ups keep every result table bit-identical: the capped float32 ranks behind them equal, bit for bit,
    those the engine gave before (whole relation sets, every head, relation and suppression ranks)."""
    from maps_utils import relations as R

    which, representation, relation, space = case
    kind = cpu_kind()
    if kind not in RECORDED_KINDS:
        pytest.skip(f"no ranks recorded on a {kind} CPU (float32 bits differ between CPU kinds): record this kind's "
                    "digests in RECORDED_ELSEWHERE from the engine before the change")
    loaded = request.getfixturevalue(which)
    names = R.list_relations() if relation == "all" else [relation]
    rels = [t for t in (R.filter_single_token(R.load(n), loaded.tokenizer) for n in names) if t.usable]
    src = [i for t in rels for i in t.source_ids]
    tgt = [i for t in rels for i in t.target_ids]
    res = ST.target_ranks(loaded.weights, src, tgt, representation=representation, compute_space=space, progress=False)
    assert res.top.dtype == torch.int16 and res.top.shape == (loaded.weights.n_layers, loaded.weights.n_heads, len(src))
    assert _digest(res) == RECORDED_ELSEWHERE.get(case, {}).get(kind, RECORDED[case])
