"""Source representations against what the real model computes (forward passes with hidden states, the modules it
applies), on tiny random models of every family and on the embedded models."""

from __future__ import annotations

import pytest
import torch

from maps_utils import HeadWeights
from maps_utils.core.errors import OptionError
from maps_utils.static import sources as SRC

from ..conftest import TINY_CONFIGS, make_tiny


def _ids(weights: HeadWeights, n: int = 12, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, weights.vocab_size, (n,), generator=g).tolist()


def hidden_states(model, ids, prefix=()) -> tuple[torch.Tensor, ...]:
    """The model's own hidden states at the last position of ``[*prefix, s]`` for every s: entry l is the residual
    at the input of layer l (for l < n_layers)."""
    batch = torch.tensor([[*prefix, s] for s in ids])
    with torch.no_grad():
        out = model(input_ids=batch, output_hidden_states=True, use_cache=False)
    return tuple(h[:, -1] for h in out.hidden_states)


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_input_norm_is_the_module_the_attention_reads_through(key):
    """The attention's real input (what its value projection receives) is input_norm(l) of the residual entering
    block l, for every family (parallel blocks included)."""
    model = make_tiny(key)
    weights = HeadWeights(model)
    ids = _ids(weights)
    seen = {}
    hooks = [weights.v_module(layer).register_forward_pre_hook(
        lambda mod, args, layer=layer: seen.__setitem__(layer, args[0][:, -1].clone()))
        for layer in range(weights.n_layers)]
    try:
        hs = hidden_states(model, ids, prefix=(3, 5))
    finally:
        for h in hooks:
            h.remove()
    for layer in range(weights.n_layers):
        with torch.no_grad():
            expected = weights.input_norm(layer)(hs[layer])
        assert torch.equal(seen[layer], expected), layer


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_context_free_is_the_residual_a_forward_pass_records(key, monkeypatch):
    model = make_tiny(key)
    model.config.bos_token_id = 7
    weights = HeadWeights(model)
    ids = _ids(weights)
    hs = hidden_states(model, ids, prefix=(7,))
    monkeypatch.setattr(SRC, "CHUNK", 5)  # chunks change nothing
    full = SRC.SourceVectors(weights, ids, "context_free")
    depth1 = SRC.SourceVectors(weights, ids, "context_free_1")
    for layer in range(weights.n_layers):
        norm = weights.input_norm(layer)
        with torch.no_grad():
            assert torch.allclose(full.layer(layer), norm(hs[layer]), rtol=1e-12, atol=1e-12), layer
            assert torch.allclose(depth1.layer(layer), norm(hs[min(layer, 1)]), rtol=1e-12, atol=1e-12), layer


SHARED_NAMES = ["first_mlp", "first_mlp+norm", "raw_mlp+norm", "first_mlp+centre+norm", "block0", "block0+norm",
                "context_free_1", "context_free_3", "context_free"]


def _every_layer(weights, ids, names):
    out = {}
    for name in SRC.deepest_first(names):
        xs = SRC.SourceVectors(weights, ids, name)
        out[name] = torch.stack([xs.layer(la) for la in range(weights.n_layers)])
    return out


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_shared_bases_give_the_same_vectors_from_one_pass(key, monkeypatch):
    """Inside shared_bases each base is computed once per token set (one forward pass per prefix, to the deepest
    layer any representation needs), and every representation's vectors are bit-identical to their own."""
    model = make_tiny(key)
    model.config.bos_token_id = 7
    weights = HeadWeights(model)
    ids = _ids(weights)
    alone = _every_layer(weights, ids, SHARED_NAMES)
    calls, real = [], SRC.residuals
    monkeypatch.setattr(SRC, "residuals", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    with SRC.shared_bases():
        shared = _every_layer(weights, ids, SHARED_NAMES)
    assert all(torch.equal(alone[name], shared[name]) for name in SHARED_NAMES)
    assert sorted(calls) == [1, weights.n_layers - 1]  # block0's pass (no prefix), then context_free's, once each
    assert SRC.deepest_first(["raw", "context_free_1", "block0", "context_free", "context_free_3"]) == \
        ["context_free", "context_free_3", "context_free_1", "block0", "raw"]


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_parameter_bases_and_norm(key):
    """raw, first_mlp(_all), raw_mlp and block0 by their definitions; +norm is layer l's input norm of the same."""
    model = make_tiny(key)
    weights = HeadWeights(model)
    ids = _ids(weights)
    with torch.no_grad():
        E = weights.embed(ids)  # what enters block 0 (checked against the forward pass in test_heads)
        mlp = weights.first_mlp(E)
        after_block0 = hidden_states(model, ids)[1]  # the token alone through block 0
    expected = {"raw": lambda la: E, "first_mlp": lambda la: mlp if la else E, "first_mlp_all": lambda la: mlp,
                "raw_mlp": lambda la: E + mlp if la else E, "block0": lambda la: after_block0 if la else E}
    for base, fn in expected.items():
        plain, normed = SRC.SourceVectors(weights, ids, base), SRC.SourceVectors(weights, ids, base + "+norm")
        for layer in range(weights.n_layers):
            with torch.no_grad():
                assert torch.allclose(plain.layer(layer), fn(layer), rtol=1e-12, atol=1e-12), (base, layer)
                assert torch.allclose(normed.layer(layer), weights.input_norm(layer)(fn(layer)),
                                      rtol=1e-12, atol=1e-12), (base, layer)


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_centre_and_nomassive_by_their_definitions(key, monkeypatch):
    """+centre subtracts the base's mean over the vocabulary sample; +nomassive zeroes the dimensions whose mean |x|
    over it exceeds MASSIVE_FACTOR times the median; +norm applies after either."""
    model = make_tiny(key)
    weights = HeadWeights(model)
    ids = _ids(weights)
    monkeypatch.setattr(SRC, "STAT_TOKENS", 40)
    monkeypatch.setattr(SRC, "MASSIVE_FACTOR", 1.2)  # random weights have no massive dimensions: make some
    rows = model.get_input_embeddings().weight.shape[0]
    sample = torch.linspace(0, rows - 1, 40).round().long().unique()
    for base in SRC.PARAMETER_BASES:
        plain, on_sample = SRC.SourceVectors(weights, ids, base), SRC.SourceVectors(weights, sample, base)
        centred, trimmed = SRC.SourceVectors(weights, ids, base + "+centre"), SRC.SourceVectors(
            weights, ids, base + "+nomassive+norm")
        for layer in range(weights.n_layers):
            x, s = plain.layer(layer), on_sample.layer(layer)
            assert torch.allclose(centred.layer(layer), x - s.mean(0), rtol=1e-12, atol=1e-12), (base, layer)
            level = s.abs().mean(0)
            keep = level <= 1.2 * level.median()
            assert 0 < int(keep.sum()) < len(keep)
            with torch.no_grad():
                expected = weights.input_norm(layer)(torch.where(keep, x, 0.0))
            assert torch.allclose(trimmed.layer(layer), expected, rtol=1e-12, atol=1e-12), (base, layer)


def test_names_parse_and_bad_names_get_one_sentence():
    assert SRC.parse("first_mlp+norm") == SRC.Representation("first_mlp+norm", "first_mlp", True)
    assert SRC.parse("context_free_4").depth == 4 and SRC.parse("context_free").depth is None
    assert not SRC.parse("context_free").parameters_only and SRC.parse("block0").parameters_only
    assert SRC.parse("block0+centre+norm") == SRC.Representation("block0+centre+norm", "block0", True, None, "centre")
    every = SRC.names(depths=(1, 2), modifiers=SRC.MODIFIERS)
    assert len(every) == len(SRC.PARAMETER_BASES) * 6 + 3 and all(SRC.parse(n).name == n for n in every)
    for bad in ("context_free+norm", "context_free_0", "mlp", "raw+norm+norm", "raw+norm+centre", "raw+centre+nomassive",
                "context_free+centre", None):
        with pytest.raises(OptionError, match="Unknown source representation") as err:
            SRC.parse(bad)
        assert "\n" not in str(err.value)


def test_default_prefix_is_the_models_bos_or_nothing():
    model = make_tiny("llama-gqa")
    model.config.bos_token_id = 4
    assert SRC.default_prefix(HeadWeights(model)) == (4,)
    model.config.bos_token_id = None
    weights = HeadWeights(model)
    assert SRC.default_prefix(weights) == ()
    ids = _ids(weights)
    hs = hidden_states(model, ids)  # the token alone
    with torch.no_grad():
        assert torch.allclose(SRC.source_vectors(weights, ids, "context_free", 1), weights.input_norm(1)(hs[1]),
                              rtol=1e-12, atol=1e-12)


@pytest.mark.embedded
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_context_free_on_embedded_models(which, request):
    """context_free of the embedded models equals a forward hook's record of [BOS, s], through the input norm."""
    loaded = request.getfixturevalue(which)
    weights = loaded.weights
    ids = loaded.tokenizer(" Paris London water", add_special_tokens=False)["input_ids"]
    bos = SRC.default_prefix(weights)
    hs = hidden_states(weights.model, ids, prefix=bos)
    xs = SRC.SourceVectors(weights, ids, "context_free")
    for layer in (0, 1, weights.n_layers - 1):
        with torch.no_grad():
            real = weights.input_norm(layer)(hs[layer])
            # float32 rounding: a batch of [BOS, s] against one sequence, a few ulps of the largest value (Gemma-3's
            # residual reaches ~100; 4.8e-5 apart on an AMD EPYC, 2026-12-01)
            torch.testing.assert_close(xs.layer(layer), real, rtol=1e-5, atol=1e-6 * float(real.abs().max()))


def test_fidelity_is_one_where_the_representation_is_what_the_model_reads(tmp_path, monkeypatch):
    """With the template "<X>" and no BOS the prompt is the token alone, so context_free is exactly the real
    normalised source (cosine 1 at every layer), block0+norm is it at layer 1, and raw+norm at layer 0."""
    import json

    from maps_utils.core.store import RunOptions
    from maps_utils.dynamic import fidelity as F
    from maps_utils.models.loading import LoadedModel

    from ..conftest import word_tokenizer

    model = make_tiny("gemma3-gqa").to(torch.float32)
    model.config.bos_token_id = None
    loaded = LoadedModel("tiny-gemma", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"),
                         torch.float32, "test", 0.0)
    rel = tmp_path / "mine.json"
    rel.write_text(json.dumps([[f"t{i}", f"t{(i * 7) % 100}"] for i in range(40)]))
    run = RunOptions(results_dir=tmp_path / "results", progress=False, batch_size=16)
    reps = ["context_free", "block0+norm", "raw+norm", "raw"]
    table = F.fidelity_profile(loaded, reps, [rel], ["<X>", "t3 t4 <X> t5"], run=run)
    prof = F.profile(table[table.template == "<X>"])
    assert list(prof.columns) == reps and prof.index.tolist() == list(range(loaded.weights.n_layers))
    assert (prof["context_free"] - 1).abs().max() < 1e-6
    assert abs(prof.loc[1, "block0+norm"] - 1) < 1e-6 and abs(prof.loc[0, "raw+norm"] - 1) < 1e-6
    assert prof.loc[1, "raw"] < 0.99  # a representation that is not what the model reads scores below 1
    summary = F.profile_summary(prof)  # what notebook 02 shows: one row per representation, best first
    assert summary.index[0] == "context_free" and summary.loc["context_free", "mean cosine"] > 1 - 1e-6
    assert summary["mean cosine"].is_monotonic_decreasing and len(summary) == len(reps)
    assert summary.loc["raw", "lowest layer mean"] == prof["raw"].min()
    assert summary.loc["raw+norm", "best layer"] == 0
    in_context = F.profile(table[table.template != "<X>"])["context_free"]
    assert abs(in_context.loc[0] - 1) < 1e-6 and in_context.loc[1] < 0.999  # context changes layer 1 on
    assert (tmp_path / "results/tiny-gemma/dynamic/fidelity/fidelity.csv").is_file()
    monkeypatch.setattr(F, "_relation_table", None)  # a rerun reads the store and computes nothing
    again = F.fidelity_profile(loaded, reps, [rel], ["<X>", "t3 t4 <X> t5"], run=run)
    assert again.equals(table)


def test_the_criterion_picks_the_representation_the_heads_read(tmp_path):
    """A constructed case: with the template "<X>" and no BOS, a head's write without context is exactly the static
    map's row under context_free (no value bias in this model), so its static scores equal the dynamic ones
    (r = 1) and the inference criterion picks it over the paper's representations."""
    import json

    from maps_utils.core.store import RunOptions
    from maps_utils.dynamic import correlation as C
    from maps_utils.dynamic import scores as DY
    from maps_utils.models.loading import LoadedModel
    from maps_utils.report import paper as P

    from ..conftest import word_tokenizer

    model = make_tiny("gemma3-gqa")
    model.config.bos_token_id = None
    weights = HeadWeights(model)
    assert weights.b_V(0) is None
    loaded = LoadedModel("tiny-gemma", model, word_tokenizer(), weights, torch.device("cpu"), torch.float64,
                         "test", 0.0)
    rel = tmp_path / "mine.json"
    rel.write_text(json.dumps([[f"t{i}", f"t{(i * 7 + 3) % 100}"] for i in range(60)]))
    run = RunOptions(results_dir=tmp_path / "results", progress=False)
    dyn = DY.dynamic_scores(loaded, [rel], ["<X>"], run=run)
    by = C.compare_representations(loaded, dyn, ["first_mlp", "raw", "context_free"], relations=[rel], run=run)
    assert by.loc[("relation", "without"), "context_free"] > 0.999
    assert C.best_representation(by) == "context_free"
    # a gain within the margin keeps the paper's representation; the plain maximum ignores it
    close = by.copy()
    close.loc[("relation", "without"), "raw"] = close.loc[("relation", "without"), "first_mlp"] + 0.04
    close.loc[("relation", "without"), "context_free"] = -1.0
    assert C.best_representation(close) == "first_mlp" and C.best_representation(close, margin=0) == "raw"
    table = C.representation_table(by)
    assert table.index.tolist() == ["first_mlp", "raw", "context_free"]  # in the order asked
    assert table.columns.tolist() == ["relation r w/o", "relation r w/", "suppression r w/o", "suppression r w/"]
    with_paper = C.representation_table(by, P.dynamic_summary())
    assert with_paper.index.name == "representation" and "paper: GPT-2 xl" in with_paper.index
