"""Dynamic scores: the per-head decomposition at the last position, the without-context value path against an
explicit attention override, padding invariance, a constructed copying head, Pearson r against scipy, and the
cached, resumable relation runs on the embedded models."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from maps_utils import relations as R
from maps_utils.core.store import RunOptions
from maps_utils.dynamic import correlation as C
from maps_utils.dynamic import scores as DY
from maps_utils.heads import HeadWeights
from maps_utils.static import scores as SC
from maps_utils.static.ranks import target_ranks

from ..conftest import TINY_CONFIGS, make_tiny

# the module: `from maps_utils.dynamic import capture` gives the package's function of that name
CA = importlib.import_module("maps_utils.dynamic.capture")


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[CA.Prompt]:
    """Prompts of the given lengths with random ids and a random source position before or at the end."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(CA.Prompt(tuple(ids), int(torch.randint(0, n, (1,), generator=g))))
    return out


LENGTHS = [5, 9, 3, 7, 9, 1, 6]


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_head_writes_at_the_last_position_sum_to_the_attention_output(key):
    model = make_tiny(key)
    weights = HeadWeights(model)
    prompts = random_prompts(model.config.vocab_size, LENGTHS)
    ids, last, source = CA.pad_batch(prompts, 0, "cpu")
    rows = torch.arange(len(prompts))
    attn_out = {}
    handles = [weights.attn_module(la).register_forward_hook(
        lambda m, a, o, la=la: attn_out.__setitem__(la, o[0][rows, last])) for la in range(weights.n_layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    z, v = CA.capture(model, weights, ids, last, source)
    with_ctx, _ = CA.head_writes(weights, z, v)
    for layer in range(weights.n_layers):
        total = with_ctx[:, layer].sum(1)
        if weights.b_O(layer) is not None:
            total = total + weights.b_O(layer)
        # transformers' GPT-J computes attention scores in float32 even in a float64 model, so its two forwards agree
        # to float32 rounding where the float32 matmul's bits depend on the batch's shape (2.9e-7 on an AMD EPYC)
        tol = 1e-6 if key == "gptj" else 1e-10
        torch.testing.assert_close(total, attn_out[layer], rtol=tol, atol=tol)


def _forced_mask(attention_mask, B: int, T: int, S: int, dtype, last: torch.Tensor, source: torch.Tensor):
    """The additive mask with each prompt's last query row closed except at its source token."""
    if attention_mask is None:
        attention_mask = torch.zeros((B, 1, T, S), dtype=dtype)
        attention_mask.masked_fill_(torch.ones(T, S, dtype=torch.bool).triu(1), torch.finfo(dtype).min)
    assert attention_mask.is_floating_point()
    m = attention_mask.expand(B, attention_mask.shape[1], T, S).clone(memory_format=torch.contiguous_format)
    for b in range(B):
        m[b, :, last[b], :] = torch.finfo(m.dtype).min
        m[b, :, last[b], source[b]] = 0.0
    return m


def _forced_attention(monkeypatch, model, weights: HeadWeights, layer: int, last: torch.Tensor, source: torch.Tensor):
    """Make ``layer``'s eager attention put all weight of each prompt's last query on its source token,
    by masking every other key of that row (an explicit override inside the model's own attention): through the
    module's shared ``eager_attention_forward``, or, where the attention computes its scores inline (Falcon), by
    replacing the mask it is called with."""
    target = weights.attn_module(layer)
    module = sys.modules[type(target).__module__]
    if not hasattr(module, "eager_attention_forward"):
        def pre(mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            B, T = hidden.shape[:2]
            kwargs["attention_mask"] = _forced_mask(kwargs.get("attention_mask"), B, T, T, hidden.dtype, last, source)
            return args, kwargs

        return target.register_forward_pre_hook(pre, with_kwargs=True)  # the caller removes it
    original = module.eager_attention_forward

    def forced(mod, query, key, value, attention_mask=None, *args, **kwargs):
        if mod is target:
            attention_mask = _forced_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.dtype,
                                          last, source)
        return original(mod, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", forced)
    return None


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_without_context_value_path_equals_an_explicit_attention_override(key, monkeypatch):
    model = make_tiny(key)
    weights = HeadWeights(model)
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=1)
    ids, last, source = CA.pad_batch(prompts, 0, "cpu")
    z_clean, v = CA.capture(model, weights, ids, last, source)
    _, without = CA.head_writes(weights, z_clean, v)
    for layer in range(weights.n_layers):
        with monkeypatch.context() as mp:
            handle = _forced_attention(mp, model, weights, layer, last, source)
            try:
                z_forced, _ = CA.capture(model, weights, ids, last, source)
            finally:
                if handle is not None:
                    handle.remove()
        # the forced head's mixed value is exactly the source's value vector of its KV group ...
        expected = v[:, layer, weights.kv_groups]
        torch.testing.assert_close(z_forced[:, layer], expected, rtol=1e-10, atol=1e-10)
        # ... so its write equals the without-context write, and earlier layers are untouched
        forced_write = torch.einsum("bhe,hem->bhm", z_forced[:, layer], weights.W_O(layer))
        torch.testing.assert_close(forced_write, without[:, layer], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(z_forced[:, :layer], z_clean[:, :layer], rtol=0, atol=0)
        assert not torch.allclose(z_forced[:, layer], z_clean[:, layer])  # the override did something


@pytest.mark.parametrize("key", ["llama-gqa", "gpt2", "gemma3-mqa", "gpt_neox-parallel"])
def test_batched_scores_equal_one_prompt_at_a_time(key):
    model = make_tiny(key)
    weights = HeadWeights(model)
    V = model.config.vocab_size
    prompts = random_prompts(V, LENGTHS * 3, seed=2)
    targets = torch.randint(0, V, (len(prompts),), generator=torch.Generator().manual_seed(3)).tolist()
    one = CA.prompt_ranks(model, weights, prompts, targets, batch_size=1, rank_cap=V, progress=False)
    batched = CA.prompt_ranks(model, weights, prompts, targets, batch_size=8, rank_cap=V, progress=False)
    assert torch.equal(one, batched)
    # exact, uncapped ranks equal a dense computation of every head write's projection
    z, v = CA.capture(model, weights, *CA.pad_batch(prompts, 0, "cpu"))
    with_ctx, without = CA.head_writes(weights, z, v)
    for slot, writes in ((0, with_ctx), (2, without)):
        logits = writes @ weights.U  # [n, L, H, V]
        t = torch.tensor(targets)[:, None, None, None]
        own = logits.gather(-1, t.expand(*logits.shape[:3], 1))
        assert torch.equal(one[slot].long(), (logits > own).sum(-1))
        assert torch.equal(one[slot + 1].long(), (logits < own).sum(-1))


def test_a_constructed_copying_head_scores_one_without_context():
    """Layer 0, head 0 of a tiny Llama maps each token's (normalised) embedding to itself: W_V = W_O = I,
    unit-norm embeddings tied to the unembedding, so the source is the unique top-1 of its own row."""
    import transformers

    d, vocab = 16, 60
    cfg = transformers.LlamaConfig(hidden_size=d, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   head_dim=d, intermediate_size=32, vocab_size=vocab, tie_word_embeddings=True,
                                   max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        E = torch.nn.functional.normalize(torch.randn(vocab, d, dtype=torch.float64), dim=1)
        model.model.embed_tokens.weight.copy_(E)
        attn = model.model.layers[0].self_attn
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        attn.v_proj.weight[:d] = torch.eye(d)
        attn.o_proj.weight[:, :d] = torch.eye(d)
    weights = HeadWeights(model)
    prompts = random_prompts(vocab, [4, 6, 2, 8, 5] * 8, seed=4)
    prompts = [p for p in prompts if p.source != p.last]
    copy_targets = [p.ids[p.source] for p in prompts]
    ranks = CA.prompt_ranks(model, weights, prompts, copy_targets, batch_size=7, rank_cap=5, progress=False)
    rel = DY.DynamicRelation("copy", None, True, [("x", "x")] * len(prompts), copy_targets, ["t"], ranks[None], [1.0],
                            k=1, rank_cap=5)
    without = rel.scores(1, "without")[0]
    assert without[0, 0] == 1.0
    assert without[0, 1] < 0.5  # the random head is no copying head
    assert rel.scores(1, "with")[0, 0, 0] < 1.0  # in context the head attends elsewhere too
    static = target_ranks(weights, list(range(vocab)), list(range(vocab)), representation="raw", rank_cap=5, progress=False)
    assert static.scores(1)[0, 0] == 1.0


def test_pearson_equals_scipy():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    for n in (3, 10, 500):
        x = rng.normal(size=n)
        y = 0.3 * x + rng.normal(size=n)
        r, p = C.pearson(x, y)
        ref = pearsonr(x, y)
        assert r == pytest.approx(ref.statistic, rel=1e-12)
        assert p == pytest.approx(ref.pvalue, rel=1e-9)
    r, p = C.pearson([1, 2, 3, 4], [2, 4, 6, 8])
    assert r == pytest.approx(1.0, abs=1e-12) and p == pytest.approx(0.0, abs=1e-9)
    assert C.pearson([1, 2, 3, 4], [8, 6, 4, 2])[0] == pytest.approx(-1.0, abs=1e-12)
    assert all(np.isnan(C.pearson([0, 0, 0, 0], [1, 2, 3, 4])))  # constant: undefined, not an error
    with pytest.raises(ValueError, match="one length"):
        C.pearson([1, 2, 3], [1, 2])


def test_paper_reference_table_reproduces_the_spec_summary():
    """The transcribed paper numbers (two decimals) give the summary statistics MAPS-SPEC §3.1 derives from the
    full-precision CSV, to rounding."""
    paper = pd.read_csv(R.default_data_dir().parent / "paper" / "dynamic_correlation.csv")
    single = paper[(paper.sources == "single_token") & (paper.score_type == "relation")]
    g = single.groupby("model")
    assert g.size()["GPT-2 xl"] == 18 and g.size()["Llama-3.1 8B"] == 19
    assert g.r_without.mean()["GPT-2 xl"] == pytest.approx(0.891, abs=2e-3)
    assert g.r_with.mean()["Llama-3.1 8B"] == pytest.approx(0.724, abs=2e-3)
    supp = paper[(paper.sources == "single_token") & (paper.score_type == "suppression")].groupby("model")
    assert supp.r_without.mean()["Pythia 12B"] == pytest.approx(0.742, abs=2e-3)
    multi = paper[(paper.sources == "multi_token") & (paper.score_type == "relation")].groupby("model")
    assert multi.r_with.min()["Pythia 12B"] == pytest.approx(0.09)


def test_prompt_templates_are_checked():
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(R.RelationError, match="exactly once"):
        CA.build_prompts(Tok(), "no placeholder", [[1]])
    with pytest.raises(R.RelationError, match="put a space before"):
        CA.build_prompts(Tok(), "About<X>", [[1]])
    p = CA.build_prompts(Tok(), "ab <X> c", [[7, 8]])[0]
    assert p.ids == (97, 98, 7, 8, 32, 99) and p.source == 3 and p.last == 5
    p = CA.build_prompts(Tok(), "ab <X>", [[7, 8]], space_in_source=False)[0]
    assert p.ids == (97, 98, 32, 7, 8) and p.source == p.last == 4


# ---- embedded models ------------------------------------------------------------------------------------
@pytest.mark.embedded
def test_smollm2_prompts_match_the_natural_tokenization(smollm2):
    tok = smollm2.tokenizer
    tr = R.filter_single_token(R.load("country_capital"), tok)
    for template in R.read_templates()["dynamic"]:
        prompts = CA.build_prompts(tok, template, [[i] for i in tr.source_ids])
        assert CA.tokenization_agreement(tok, template, [s for s, _ in tr.pairs], prompts) == 1.0
        assert all(p.ids[p.source] == s for p, s in zip(prompts, tr.source_ids, strict=True))
    paper = R.filter_multi_token(R.load("country_capital"), tok, min_pairs=1)
    p = CA.build_prompts(tok, "This is a document about <X>", paper.source_ids[:3], space_in_source=False)
    head = tok("This is a document about ", add_special_tokens=True)["input_ids"]
    assert all(q.ids[: len(head)] == tuple(head) and q.source == q.last for q in p)


@pytest.mark.embedded
def test_dynamic_scores_are_cached_resumable_and_correlated(smollm2, tmp_path, monkeypatch):
    rels = ["country_capital", "name_copying"]
    kw = dict(max_pairs=30, templates=["No <X> means no", "This is a document about <X>"],
              run=RunOptions(results_dir=tmp_path, progress=False))
    calls = []
    real = CA.prompt_ranks

    def failing_second(*args, **kwargs):
        calls.append(kwargs["desc"])
        if kwargs["desc"].startswith("name_copying"):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(DY, "prompt_ranks", failing_second)
    with pytest.raises(KeyboardInterrupt):
        DY.dynamic_scores(smollm2, rels, **kw)
    assert (tmp_path / "smollm2-135m" / "dynamic" / "single" / "parts" / "country_capital.pt").is_file()
    monkeypatch.setattr(DY, "prompt_ranks", real)
    dyn = DY.dynamic_scores(smollm2, rels, **kw)
    assert dyn.reused == ["country_capital"]  # the interrupted run's finished relation is kept
    again = DY.dynamic_scores(smollm2, rels, **kw)
    assert again.reused == rels
    assert torch.equal(again.relation("name_copying").ranks, dyn.relation("name_copying").ranks)
    out = tmp_path / "smollm2-135m" / "dynamic" / "single"
    table = pd.read_csv(out / "scores.csv")
    assert len(table) == 2 * 2 * 2 * 30 * 9  # relations x templates x contexts x heads
    assert set(table.n_prompts) == {30}
    assert (out / "scores.manifest.json").is_file()
    # a different cap on pairs is a different run
    assert DY.dynamic_scores(smollm2, rels, **{**kw, "max_pairs": 31}).reused == []

    static = SC.static_scores(smollm2, rels, run=RunOptions(results_dir=tmp_path, progress=False))
    corr = C.correlations(static, dyn)
    assert len(corr) == 2 * 2 * 2  # relations x score types x contexts
    row = corr[(corr.relation == "country_capital") & (corr.score_type == "relation") & (corr.context == "without")]
    s = static.score_map("country_capital").flatten().repeat(2).numpy()
    d = dyn.relation("country_capital").scores(10, "without").flatten().numpy()
    assert row.r.item() == pytest.approx(np.corrcoef(s, d)[0, 1], rel=1e-9)
    assert row.n_points.item() == 2 * 270
    assert set(C.correlation_summary(corr).context) == {"with", "without"}


@pytest.mark.embedded
def test_gemma3_dynamic_and_multi_token_scores_run(gemma3, tmp_path):
    dyn = DY.dynamic_scores(gemma3, ["country_capital"], templates=["When I think about <X> I think about"], max_pairs=30,
                            run=RunOptions(results_dir=None, progress=False))
    rel = dyn.relation("country_capital")
    assert rel.ranks.shape == (1, 4, 30, 18, 4)
    assert rel.tokenization_agreement == [1.0]
    multi = DY.multi_token_scores(gemma3, ["country_capital"], max_pairs=30,
                                  run=RunOptions(results_dir=tmp_path, progress=False))
    assert multi.relation("country_capital").ranks.shape == (1, 4, 30, 18, 4)
    assert (tmp_path / "gemma3-270m" / "dynamic" / "multi_token_paper" / "scores.csv").is_file()
    with pytest.raises(R.RelationError, match="usable multi-token pairs"):
        DY.multi_token_scores(gemma3, ["copying"], mode="natural",
                              run=RunOptions(results_dir=None, progress=False))
    with pytest.raises(ValueError, match="Unknown multi-token mode"):
        DY.multi_token_scores(gemma3, mode="other")
