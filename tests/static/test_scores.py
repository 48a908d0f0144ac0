"""Tidy static-score tables: contents, caching, resuming, and the representation criterion (tiny models)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from maps_utils import HeadWeights, LoadedModel
from maps_utils import relations as R
from maps_utils.core.store import RunOptions
from maps_utils.static import ranks as S
from maps_utils.static import scores as SC
from maps_utils.static import tables as TB

from ..conftest import make_tiny, word_tokenizer


@pytest.fixture
def tiny_loaded():
    model = make_tiny("llama-gqa").to(torch.float32)
    return LoadedModel("tiny-llama", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"), torch.float32,
                       "test", 0.0)


def _relation(tmp_path, name, pairs):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(pairs))
    return path


def test_table_is_tidy_and_matches_the_engine(tiny_loaded, tmp_path):
    pairs = [[f"t{i}", f"t{(i * 7) % 100}"] for i in range(40)]
    rel = _relation(tmp_path, "mine", pairs)
    res = SC.static_scores(tiny_loaded, [rel], representation="first_mlp",
                           run=RunOptions(results_dir=tmp_path / "results", progress=False))
    table = res.table()
    assert list(table.columns) == ["model", "relation", "category", "layer", "head", "kv_group", "score",
                                   "suppression_score", "k", "n_pairs", "variant"]
    assert len(table) == 2 * 4 and (table.k == 10).all() and (table.n_pairs == 40).all()
    assert table.kv_group.tolist() == [0, 0, 1, 1] * 2
    direct = S.target_ranks(tiny_loaded.weights, [i for i in range(40)], [(i * 7) % 100 for i in range(40)],
                            representation="first_mlp", progress=False)
    assert torch.allclose(torch.tensor(table.score.values).view(2, 4), direct.scores(10))
    assert torch.allclose(torch.tensor(table.suppression_score.values).view(2, 4), direct.scores(10, True))
    assert (res.table(k=3).k == 3).all()
    from maps_utils.relations import LLAMA3_TOP_K, TopK

    assert (res.table(top_k=LLAMA3_TOP_K).k == 25).all() and TopK().of(res.relation("mine")) == 10
    assert torch.equal(res.score_map("mine", top_k=TopK(other=25)), res.score_map("mine", 25))
    out = tmp_path / "results" / "tiny-llama" / "static" / "first_mlp"
    assert {p.name for p in out.iterdir()} == {"ranks", "scores.csv", "manifest.json"}
    assert sorted(p.name for p in (out / "ranks").glob("*.pt")) == ["mine.pt"]  # one slot per relation
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["variant"] == "first_mlp" and manifest["wall_seconds"] >= 0  # its name of 0.1
    assert "representation" not in manifest["parameters"]
    assert {"versions", "git_commit", "model"} <= manifest.keys()


def test_relations_below_min_pairs_are_skipped(tiny_loaded, tmp_path):
    small = _relation(tmp_path, "small", [[f"t{i}", f"t{i}"] for i in range(10)])
    big = _relation(tmp_path, "big", [[f"t{i}", f"t{i}"] for i in range(30)])
    res = SC.static_scores(tiny_loaded, [small, big], run=RunOptions(results_dir=None, progress=False))
    assert [r.name for r in res.relations] == ["big"] and res.skipped == {"small": 10}
    assert res.relation("big").copying is False  # user relations carry no metadata


def test_cache_is_reused_and_invalidated(tiny_loaded, tmp_path, monkeypatch):
    rel = _relation(tmp_path, "mine", [[f"t{i}", f"t{i + 1}"] for i in range(35)])
    first = SC.static_scores(tiny_loaded, [rel], run=RunOptions(results_dir=tmp_path, progress=False))
    calls = []
    real = S.layer_ranks
    monkeypatch.setattr(S, "layer_ranks", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = SC.static_scores(tiny_loaded, [rel], run=RunOptions(results_dir=tmp_path, progress=False))
    assert calls == [] and torch.equal(again.ranks.top, first.ranks.top)
    assert again.from_cache and not first.from_cache
    rel.write_text(json.dumps([[f"t{i}", f"t{i + 2}"] for i in range(35)]))  # changed input: recomputed
    SC.static_scores(tiny_loaded, [rel], run=RunOptions(results_dir=tmp_path, progress=False))
    assert len(calls) == 2


def test_interrupted_run_resumes_from_finished_layers(tiny_loaded, tmp_path, monkeypatch):
    rel = _relation(tmp_path, "mine", [[f"t{i}", f"t{99 - i}"] for i in range(40)])
    reference = SC.static_scores(tiny_loaded, [rel], run=RunOptions(results_dir=None, progress=False))
    monkeypatch.setattr(SC, "CHECKPOINT_SECONDS", 0.0)
    real = S.layer_ranks
    seen = []

    def flaky(heads, layer, *a, **k):
        seen.append(layer)
        if layer == 1 and seen.count(1) == 1:
            raise KeyboardInterrupt
        return real(heads, layer, *a, **k)

    monkeypatch.setattr(S, "layer_ranks", flaky)
    with pytest.raises(KeyboardInterrupt):
        SC.static_scores(tiny_loaded, [rel], run=RunOptions(results_dir=tmp_path, progress=False))
    partial = tmp_path / "tiny-llama" / "static" / "first_mlp" / "ranks" / "partial.pt"
    assert partial.is_file()
    resumed = SC.static_scores(tiny_loaded, [rel], run=RunOptions(results_dir=tmp_path, progress=False))
    assert seen == [0, 1, 1]  # layer 0 was not recomputed
    assert torch.equal(resumed.ranks.top, reference.ranks.top)
    assert not partial.exists()


def test_choose_representation_picks_the_copying_one(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=32, vocab_size=101, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # layer 1, head 0: W_V W_O = I on unit-norm tied embeddings, so M = E E^T copies
        for p in model.parameters():
            p.normal_(0, 0.3)
        emb = model.model.embed_tokens.weight
        emb /= emb.norm(dim=1, keepdim=True)
        model.model.layers[1].self_attn.v_proj.weight[:16] = torch.eye(16)
        model.model.layers[1].self_attn.o_proj.weight[:, :16] = torch.eye(16)
    loaded = LoadedModel("tiny-copy", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"), torch.float32,
                         "test", 0.0)
    rel = _relation(tmp_path, "copy", [[f"t{i}", f"t{i}"] for i in range(100)])
    best, table = SC.choose_representation(loaded, relations=("copy",), scoring_relations=[rel],
                                           run=RunOptions(results_dir=None, progress=False))
    assert best == "raw" and table.loc["raw", "best_head_copying"] == 1.0
    assert table.loc["first_mlp", "best_head_copying"] < 1.0


def test_registry_representations():
    from maps_utils.models.loading import (
        EMBEDDED,
        PAPER_REPRESENTATION,
        default_representation,
        representation_note,
    )
    from maps_utils.static import sources
    from maps_utils.static.sources import salient_representation

    assert PAPER_REPRESENTATION == "first_mlp" and default_representation("gpt2-xl") == "first_mlp"
    assert representation_note("gpt2-xl") == ""
    for name, entry in EMBEDDED.items():
        sources.check(entry.representation)
        assert default_representation(name) == entry.representation and entry.representation_reason != ""
        assert representation_note(name).startswith(entry.representation_reason)
    assert salient_representation("first_mlp") == salient_representation("raw") == "first_mlp_all"
    assert salient_representation("context_free") == "context_free"


def _synthetic_table(profiles: torch.Tensor, kv_groups: list[int], categories: list[str]) -> pd.DataFrame:
    L, H, R = profiles.shape
    rows = []
    for r in range(R):
        for layer in range(L):
            for h in range(H):
                rows.append({"relation": f"r{r}", "category": categories[r], "layer": layer, "head": h,
                             "kv_group": kv_groups[h], "score": float(profiles[layer, h, r]),
                             "suppression_score": 0.0, "k": 10, "n_pairs": 40})
    return pd.DataFrame(rows)


def test_category_map_and_top_heads():
    prof = torch.zeros(2, 2, 3)
    prof[0, 0, 0] = 0.5  # algorithmic only
    prof[1, 1, 1] = prof[1, 1, 2] = 0.9  # knowledge + linguistic
    prof[1, 0, 2] = 0.1  # below tau
    table = _synthetic_table(prof, [0, 0], ["algorithmic", "knowledge", "linguistic"])
    cats = TB.category_map(table, tau=0.15).set_index(["layer", "head"]).label.to_dict()
    assert cats == {(0, 0): "algorithmic", (0, 1): "unclassified", (1, 0): "unclassified", (1, 1): "2 categories"}
    top = TB.top_heads(table, n=2).set_index("relation")
    assert top.loc["r2", "top heads"] == "1.1 (0.90), 1.0 (0.10)"
    assert top.loc["r2", "heads >= 0.15"] == 1


@pytest.mark.parametrize("groups", [[0, 0, 1, 1], [0, 0, 0, 0]])
def test_kv_group_similarity_detects_shared_profiles(groups):
    g = torch.Generator().manual_seed(1)
    L, H, R = 8, 4, 12
    if len(set(groups)) > 1:  # heads of one group share a profile (plus noise)
        base = torch.rand(L, 2, R, generator=g)
        prof = base[:, torch.tensor(groups)] + 0.05 * torch.rand(L, H, R, generator=g)
    else:  # one group per layer: heads of a layer share a profile
        prof = torch.rand(L, 1, R, generator=g).expand(L, H, R) + 0.05 * torch.rand(L, H, R, generator=g)
    shared = TB.kv_group_similarity(_synthetic_table(prof, groups, ["linguistic"] * R), n_perm=200)
    assert shared["difference"] > 0 and shared["p_value"] < 0.01
    noise = TB.kv_group_similarity(_synthetic_table(torch.rand(L, H, R, generator=g), groups, ["linguistic"] * R),
                                   n_perm=200)
    assert noise["p_value"] > 0.01


def test_run_options_make_every_result_path_and_manifests_record_every_argument(tiny_loaded, tmp_path):
    import inspect

    from maps_utils.core.manifest import call_arguments
    from maps_utils.core.store import result_folder

    run = RunOptions(results_dir=tmp_path, progress=False, memory_budget_mb=64.0)
    assert run.folder("org/model", "static") == result_folder(tmp_path, "org/model", "static") == \
        tmp_path / "org__model" / "static"
    assert RunOptions(results_dir=None).folder("m") is None
    assert RunOptions().batch(64) == 64 and RunOptions(batch_size=8).batch(64) == 8
    assert call_arguments({"run": run, "top_k": R.TopK(), "relations": [R.Relation("r", (("a", "b"),))],
                           "path": tmp_path, "loaded": tiny_loaded}) == {
        "run": {**run.manifest(), "results_dir": str(tmp_path)}, "top_k": {"copying": 1, "other": 10},
        "relations": ["r"], "path": str(tmp_path)}

    rel = _relation(tmp_path, "mine", [[f"t{i}", f"t{i + 1}"] for i in range(35)])
    res = SC.static_scores(tiny_loaded, [rel], rank_cap=20, run=run)
    params = res.manifest["parameters"]
    # a parameter added to the signature is recorded without anyone listing it (a renamed one under its old name)
    recorded_as = {"representation": "variant"}
    assert {recorded_as.get(p, p) for p in inspect.signature(SC.static_scores).parameters} - {"loaded"} <= set(params)
    assert params["run"]["memory_budget_mb"] == 64.0 and params["rank_cap"] == 20
    assert (run.folder("tiny-llama", "static", res.representation) / "scores.csv").is_file()
