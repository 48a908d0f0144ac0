"""Renamed public names (one name per concept, issue 36): the old spelling still works for one release, warns with the
new name, and gives the same result; nothing stored changes with the spelling."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from maps_utils.core import deprecation as D
from maps_utils.core.store import RunOptions
from maps_utils.heads import HeadWeights
from maps_utils.models.loading import LoadedModel

from ..conftest import make_tiny, one_sentence, word_tokenizer


# ---- the helpers ------------------------------------------------------------------------------------------
def test_a_renamed_argument_is_taken_under_its_old_name_with_a_warning():
    @D.renamed_arguments(old="new")
    def f(a, *, new=0):
        return a + new

    assert f(1, new=2) == 3
    with pytest.warns(DeprecationWarning, match=r"f\(old=\.\.\.\) is renamed new=") as caught:
        assert f(1, old=2) == 3
    assert caught[0].filename == __file__  # the warning points at the caller's line
    with pytest.raises(TypeError, match=r"got old= and new=; pass new= only"):
        f(1, old=2, new=3)
    assert list(inspect.signature(f).parameters) == ["a", "new"]  # help() shows the new name only


def test_renamed_attributes_functions_and_constants():
    @D.renamed_arguments(old="new")
    @dataclass
    class Box:
        new: int = 0
        old = D.renamed_attribute("old", "new")

    box = Box(new=1)
    with pytest.warns(DeprecationWarning, match=r"Box\.old is renamed \.new"):
        assert box.old == 1
    with pytest.warns(DeprecationWarning):
        box.old = 5
    assert box.new == 5 and box == Box(5)
    with pytest.warns(DeprecationWarning, match=r"Box\(old=\.\.\.\) is renamed new="):
        assert Box(old=2).new == 2

    def new_name(x):
        return 2 * x

    alias = D.renamed_function(new_name, "old_name")
    with pytest.warns(DeprecationWarning, match=r"old_name\(\) is renamed new_name\(\)"):
        assert alias(3) == 6
    assert alias.__name__ == "old_name" and alias.__wrapped__ is new_name

    getter = D.renamed_constants({"__name__": "mod", "NEW": 7}, {"OLD": "NEW"})
    with pytest.warns(DeprecationWarning, match=r"mod\.OLD is renamed NEW"):
        assert getter("OLD") == 7
    with pytest.raises(AttributeError, match="no attribute 'OTHER'"):
        getter("OTHER")


# ---- the source representation: `variant` -> `representation` -----------------------------------------------
@pytest.fixture
def tiny_loaded():
    model = make_tiny("llama-gqa").to(torch.float32)
    return LoadedModel("tiny-llama", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"), torch.float32,
                       "test", 0.0)


def test_the_static_engine_takes_variant_and_gives_the_same_ranks(tiny_loaded, tmp_path):
    import json

    from maps_utils.static import ranks as S
    from maps_utils.static import salient as SAL
    from maps_utils.static import scores as SC

    w = tiny_loaded.weights
    new = S.target_ranks(w, list(range(40)), list(range(40)), representation="raw", progress=False)
    with pytest.warns(DeprecationWarning, match=r"target_ranks\(variant=\.\.\.\) is renamed representation="):
        old = S.target_ranks(w, list(range(40)), list(range(40)), variant="raw", progress=False)
    assert torch.equal(new.top, old.top) and torch.equal(new.bottom, old.bottom)
    with pytest.warns(DeprecationWarning, match=r"RankResult\.variant is renamed \.representation"):
        assert old.variant == "raw" == new.representation

    sal = SAL.saliency(w, representation="raw", progress=False)
    with pytest.warns(DeprecationWarning):
        assert torch.equal(SAL.saliency(w, variant="raw", progress=False), sal)
    with pytest.warns(DeprecationWarning):
        maps = SAL.top_mappings(w, 1, 0, [3, 4], variant="raw")
    assert torch.equal(maps[1], SAL.top_mappings(w, 1, 0, [3, 4], representation="raw")[1])
    with pytest.warns(DeprecationWarning):
        ops = SAL.salient_operations(w, n_tokens=2, variant="raw", heads_subset=[(0, 0)], saliency_scores=sal)
    assert ops.equals(SAL.salient_operations(w, n_tokens=2, representation="raw", heads_subset=[(0, 0)],
                                             saliency_scores=sal))

    rel = tmp_path / "mine.json"
    rel.write_text(json.dumps([[f"t{i}", f"t{(i * 7) % 100}"] for i in range(40)]))
    run = RunOptions(results_dir=None, progress=False)
    res = SC.static_scores(tiny_loaded, [rel], representation="raw", run=run)
    with pytest.warns(DeprecationWarning, match=r"static_scores\(variant=\.\.\.\) is renamed representation="):
        res_old = SC.static_scores(tiny_loaded, [rel], variant="raw", run=run)
    pd.testing.assert_frame_equal(res.table(), res_old.table())
    with pytest.warns(DeprecationWarning, match=r"StaticScores\.variant is renamed \.representation"):
        assert res_old.variant == "raw"
    assert res.manifest["parameters"] == res_old.manifest["parameters"]  # the same record either way
    assert SC.choose_variant.__wrapped__ is SC.choose_representation


def test_loaded_and_embedded_models_keep_their_old_attribute_names(tiny_loaded):
    from maps_utils import models
    from maps_utils.models import loading as LD
    from maps_utils.static import sources

    with pytest.warns(DeprecationWarning, match=r"LoadedModel\.variant is renamed \.representation"):
        assert tiny_loaded.variant == "first_mlp"
    with pytest.warns(DeprecationWarning):
        tiny_loaded.variant = "raw"
    assert tiny_loaded.representation == "raw"
    with pytest.warns(DeprecationWarning, match=r"LoadedModel\(variant=\.\.\.\) is renamed representation="):
        again = LoadedModel(tiny_loaded.name, tiny_loaded.model, tiny_loaded.tokenizer, tiny_loaded.weights,
                            tiny_loaded.device, tiny_loaded.dtype, "test", 0.0, variant="context_free")
    assert again.representation == "context_free"

    gemma = LD.EMBEDDED["gemma3-270m"]
    with pytest.warns(DeprecationWarning, match=r"EmbeddedModel\.embedding_variant is renamed \.representation"):
        assert gemma.embedding_variant == gemma.representation == "context_free"
    with pytest.warns(DeprecationWarning, match=r"EmbeddedModel\.variant_note is renamed \.representation_reason"):
        assert gemma.variant_note == gemma.representation_reason
    for module in (LD, models):
        with pytest.warns(DeprecationWarning, match=r"PAPER_VARIANT is renamed PAPER_REPRESENTATION"):
            assert module.PAPER_VARIANT == LD.PAPER_REPRESENTATION == "first_mlp"
    with pytest.warns(DeprecationWarning, match=r"default_variant\(\) is renamed default_representation\(\)"):
        assert models.default_variant("gemma3-270m") == "context_free"
    with pytest.warns(DeprecationWarning, match=r"variant_note\(\) is renamed representation_note\(\)"):
        assert models.variant_note("gpt2-xl") == ""
    with pytest.warns(DeprecationWarning, match=r"salient_variant\(\) is renamed salient_representation\(\)"):
        assert sources.salient_variant("raw") == "first_mlp_all"


def test_the_correlation_helpers_take_their_old_names():
    from maps_utils.dynamic import correlation as C

    by = pd.DataFrame({"first_mlp": [0.5, 0.4, 0.1, 0.1], "raw": [0.3, 0.7, 0.1, 0.2],
                       "context_free_1": [0.6, 0.5, 0.2, 0.2]},
                      index=pd.MultiIndex.from_product([["relation", "suppression"], ["with", "without"]]))
    with pytest.warns(DeprecationWarning, match=r"best_variant\(\) is renamed best_representation\(\)"):
        assert C.best_variant(by) == C.best_representation(by) == "raw"
    with pytest.warns(DeprecationWarning, match=r"best_representation\(by_variant=\.\.\.\) is renamed"):
        assert C.best_representation(by_variant=by, margin=0) == "raw"
    with pytest.warns(DeprecationWarning):
        pd.testing.assert_frame_equal(C.representation_table(by_variant=by), C.representation_table(by))
    with pytest.warns(DeprecationWarning):
        pd.testing.assert_frame_equal(C.depth_curve(by_variant=by), C.depth_curve(by))
    assert C.compare_variants.__wrapped__ is C.compare_representations
    with pytest.raises(TypeError, match="variants= and representations="):
        C.compare_representations(None, None, variants=["raw"], representations=["raw"])


@pytest.mark.parametrize("where, name", [
    ("maps_utils.describe.pipeline", "salient_ops"), ("maps_utils.describe.pipeline", "cached_saliency"),
    ("maps_utils.describe.pipeline", "describe_heads"), ("maps_utils.describe.exec_study", "describe_executable"),
    ("maps_utils.report.atlas", "build_atlas"),
])
def test_every_entry_point_that_took_variant_still_does(where, name):
    import importlib

    func = getattr(importlib.import_module(where), name)
    assert "representation" in inspect.signature(func).parameters
    with pytest.raises(TypeError, match="variant= and representation="):  # the old name is mapped before the call
        func(None, variant="raw", representation="raw")


# ---- DynamicRelation.agreement -> tokenization_agreement ------------------------------------------------------
def test_dynamic_slots_keep_the_field_name_agreement(tiny_loaded, tmp_path):
    import json

    from maps_utils.core.store import Slots
    from maps_utils.dynamic import scores as DY

    rel = tmp_path / "mine.json"
    rel.write_text(json.dumps([[f"t{i}", f"t{(i * 7 + 3) % 100}"] for i in range(40)]))
    run = RunOptions(results_dir=tmp_path / "res", progress=False)
    first = DY.dynamic_scores(tiny_loaded, [rel], ["<X>", "a <X>"], run=run).relation("mine")
    slot = dict(Slots(tmp_path / "res" / "tiny-llama" / "dynamic" / "single" / "parts").entries())["mine"]
    fields = list(slot["value"]["relation"])
    assert fields == ["name", "category", "copying", "pairs", "target_ids", "templates", "ranks", "agreement", "k",
                      "rank_cap", "seconds"]  # the slot's layout of engine version 2, unchanged
    again = DY.dynamic_scores(tiny_loaded, [rel], ["<X>", "a <X>"], run=run)
    assert again.reused == ["mine"]  # read back from the slot
    back = again.relation("mine")
    assert back.tokenization_agreement == first.tokenization_agreement and torch.equal(back.ranks, first.ranks)
    assert DY.DynamicRelation.from_stored(first.stored()) == first
    with pytest.warns(DeprecationWarning, match=r"DynamicRelation\.agreement is renamed \.tokenization_agreement"):
        assert back.agreement == back.tokenization_agreement
    with pytest.warns(DeprecationWarning, match=r"DynamicRelation\(agreement=\.\.\.\) is renamed"):
        assert DY.DynamicRelation(**first.stored()) == first  # what the code before the rename did with a slot


def test_the_prompt_style_takes_its_old_names():
    from maps_utils.describe import pipeline as DS

    ops = pd.DataFrame({"layer": [0, 0], "head": [1, 1], "rank": [0, 1], "token": [" a", " b"],
                        "mappings": [[" a", " x"], [" b", " y"]]})
    with pytest.warns(DeprecationWarning, match=r"head_prompts\(variant=\.\.\.\) is renamed style="):
        assert DS.head_prompts(ops, variant="hinted") == DS.head_prompts(ops, style="hinted")
    with pytest.warns(DeprecationWarning, match="PROMPT_VARIANTS is renamed PROMPT_STYLES"):
        assert DS.PROMPT_VARIANTS == DS.PROMPT_STYLES == ("paper", "hinted")
    with pytest.raises(ValueError, match=r"prompt_style='plain': use one of paper, hinted"):
        DS.head_prompts(ops, style="plain")
    with pytest.raises(TypeError, match="prompt_variant= and prompt_style="):
        DS.describe_heads(None, prompt_variant="paper", prompt_style="paper")


def test_the_two_kinds_have_their_own_names():
    from maps_utils.ablation import experiment as A
    from maps_utils.human import questions as Q

    with pytest.warns(DeprecationWarning, match=r"experiment\.KINDS is renamed ABLATIONS"):
        assert A.KINDS == A.ABLATIONS == ("zero", "mean")
    with pytest.warns(DeprecationWarning, match=r"questions\.KINDS is renamed OPERATION_KINDS"):
        assert Q.KINDS == Q.OPERATION_KINDS
    assert Q.QUESTIONS["operation_kind"] == Q.OPERATION_KINDS and "other" in Q.OPERATION_KINDS


def test_each_summary_says_what_it_summarises():
    from maps_utils import dynamic
    from maps_utils.describe import detection_stats as TS
    from maps_utils.dynamic import correlation as C

    corr = pd.DataFrame({"score_type": ["relation"] * 3, "context": ["without"] * 3, "r": [0.2, 0.4, float("nan")]})
    with pytest.warns(DeprecationWarning, match=r"summary\(\) is renamed correlation_summary\(\)"):
        pd.testing.assert_frame_equal(C.summary(corr), C.correlation_summary(corr))
    with pytest.warns(DeprecationWarning):
        dynamic.summary(corr)
    scores = pd.DataFrame({"describer": ["x", "x"], "score": [0.8, 0.6], "control_score": [0.5, 0.5],
                           "has_pattern": [True, False], "judged": ["ok", "ok"]})
    with pytest.warns(DeprecationWarning, match=r"summary\(\) is renamed detection_summary\(\)"):
        pd.testing.assert_frame_equal(TS.summary(scores, n_boot=10), TS.detection_summary(scores, n_boot=10))


def test_the_cli_takes_variant_with_a_notice(tmp_path, cache, capsys):
    from maps_utils.cli import main

    args = ["score", "smollm2-135m", "--results-dir", str(tmp_path / "res")]
    assert main([*args, "--representation", "first-mlp"]) == 2
    new = one_sentence(capsys.readouterr().err)
    with pytest.warns(DeprecationWarning, match="--variant is renamed --representation"):
        assert main([*args, "--variant", "first-mlp"]) == 2
    note, err = capsys.readouterr().err.strip().split("\n")
    assert note.startswith("note: --variant is renamed --representation") and err == new
    assert "Unknown source representation 'first-mlp'" in new


def test_notebooks_take_their_old_parameter_names():
    from maps_utils.core.params import check_namespace

    ns = {"representation": None, "compare_representations": True, "variant": "raw", "compare_variants": False,
          "prompt_style": None, "prompt_variant": "hinted", "k": 3}
    with pytest.warns(DeprecationWarning) as caught:
        assert check_namespace(ns) == {"k": 3}
    assert [str(w.message).split(";")[0] for w in caught] == [
        "the notebook parameter variant is renamed representation",
        "the notebook parameter compare_variants is renamed compare_representations",
        "the notebook parameter prompt_variant is renamed prompt_style"]
    assert ns == {"representation": "raw", "compare_representations": False, "prompt_style": "hinted", "k": 3}
    ns = {"representation": "first_mlp", "ov_representation": None, "variant": "raw"}  # notebook 06
    with pytest.warns(DeprecationWarning, match="variant is renamed ov_representation"):
        check_namespace(ns)
    assert ns == {"representation": "first_mlp", "ov_representation": "raw"}
