"""Detection scoring of descriptions: evidence, judges (rules, a scripted LLM server, the real local model),
balanced accuracy, shuffled controls, summaries and agreement with people."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from maps_utils.core.store import RunOptions
from maps_utils.describe import client as DR
from maps_utils.describe import detection as T
from maps_utils.describe import detection_stats as TS
from maps_utils.describe import pipeline as DS
from maps_utils.describe.rules import describe_ops, predicate_library
from maps_utils.human import agreement as AG

from .test_describe import scripted  # noqa: F401 (fixture)

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "house", "paper", "dream", "plant",
         "storm", "glass", "bread", "chair", "ocean", "tiger", "money", "smile", "night", "sugar", "train", "world",
         "heart", "field", "horse", "metal", "voice", "beach", "grass", "queen", "watch", "youth", "laugh", "spice",
         "flame", "coast", "frost", "pearl"]


def _random_word(rng) -> str:
    return " " + "".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), size=5))


def _head_rows(layer: int, head: int, kind: str, rng, n: int = 40) -> list[dict]:
    rows = []
    for rank in range(n):
        if kind == "copy":
            w = " " + WORDS[rank]
            maps = [w, w.upper(), _random_word(rng), _random_word(rng), _random_word(rng)]
        else:
            w, maps = _random_word(rng), [_random_word(rng) for _ in range(5)]
        rows.append({"layer": layer, "head": head, "rank": rank, "token": w, "token_id": rank, "saliency": 1.0,
                     "mappings": maps, "mapping_ids": list(range(5))})
    return rows


def _result(kinds: dict, llm: dict | None = None, n_salient: int = 15) -> DS.DescriptionResult:
    """A DescriptionResult of hand-made heads: {(layer, head): "copy" | "random"}; ``llm`` gives LLM patterns."""
    rng = np.random.default_rng(1)
    every = pd.DataFrame([r for (la, h), k in sorted(kinds.items()) for r in _head_rows(la, h, k, rng)])
    ops, evidence = every[every["rank"] < n_salient], every[every["rank"] >= n_salient]
    llm = llm or {}
    table = pd.DataFrame([{"layer": la, "head": h, "quartile": la, "salient_tokens": "", "status": "ok", "parse": "json",
                           "has_pattern": (la, h) in llm, "pattern": llm.get((la, h), "Unclear"), "inputs": "words"}
                          for la, h in sorted(kinds)])
    return DS.DescriptionResult("hand-made", ops.reset_index(drop=True), table, {"model": None}, 4,
                               evidence.reset_index(drop=True), describe_ops(ops))


HEAD_KINDS = {(0, 0): "copy", (1, 0): "random", (2, 0): "random", (3, 0): "random", (3, 1): "random"}


def test_balanced_accuracy_auc_and_bootstrap_by_hand():
    assert T.balanced_accuracy([1, 1, 0, 0], [1, 0, 0, 0]) == 0.75
    assert T.balanced_accuracy([1, 1, 0, 0], [1, 1, 1, 1]) == 0.5
    assert np.isnan(T.balanced_accuracy([1, 1], [1, 0]))
    assert TS.auc([0.9, 0.8, 0.1, 0.8], [True, True, False, False]) == pytest.approx((2 + 1 + 0.5) / 4)
    lo, hi = TS.bootstrap_ci([1.0, 1.0, 1.0])
    assert lo == hi == 1.0
    lo, hi = TS.bootstrap_ci([0.0, 1.0] * 20, seed=3)
    assert 0.3 < lo < 0.5 < hi < 0.7


def test_judge_answers_parse_to_selections():
    assert T.parse_judge('{"matching_rows": [1, 3, 99]}', 4) == {"selected": {1, 3}}
    assert T.parse_judge('Sure! {"rows": ["2"]}', 4) == {"selected": {2}}
    assert T.parse_judge("[4, 1]", 4) == {"selected": {1, 4}}
    assert T.parse_judge("no idea", 4) is None
    assert T.parse_judge('{"margins": [0.5, -1, 2, 0.5]}', 4) == {"margins": [0.5, -1.0, 2.0, 0.5]}
    assert T.selection({"margins": [0.5, -1, 2, 0.5]}, 2, 4) == [True, False, True, False]  # ties: earlier row
    assert T.selection({"selected": {2}}, 1, 3) == [False, True, False]


def test_evidence_is_held_out_balanced_and_seeded():
    res = _result(HEAD_KINDS)
    rows = T.evidence_rows(res.evidence, res.ops, seed=0)
    assert set(rows) == set(HEAD_KINDS)
    for head, rs in rows.items():
        pos = [r for r in rs if r["label"]]
        assert len(pos) == 25 and len(rs) == 50
        shown = set(res.ops[(res.ops.layer == head[0]) & (res.ops["head"] == head[1])].token)
        assert not shown & {r["source"] for r in rs}  # the describer never saw any evidence row's source
    assert rows == T.evidence_rows(res.evidence, res.ops, seed=0)
    assert rows != T.evidence_rows(res.evidence, res.ops, seed=1)


def test_shuffled_partners_are_other_heads_with_a_pattern():
    has = {(0, 0): True, (1, 0): True, (2, 0): False, (3, 0): True}
    p = T.partners(has, seed=0)
    assert all(p[h] != h and has[p[h]] for h in has)
    assert T.partners({(0, 0): True, (1, 0): False}, seed=0) == {(0, 0): None, (1, 0): (0, 0)}


def test_a_copy_head_is_verified_at_one_by_its_rule_and_random_heads_are_not():
    res = _result(HEAD_KINDS)
    rules = res.rules.set_index(["layer", "head"])
    assert json.loads(rules.loc[(0, 0), "predicates"])[0] == "copy" and "cop" in rules.loc[(0, 0), "pattern"]
    rows = T.evidence_rows(res.evidence, res.ops, seed=0)
    s = T.score_rules(res.rules, rows, predicate_library([])).set_index(["layer", "head"])
    assert s.loc[(0, 0), "score"] == 1.0 and s.loc[(0, 0), "judged"] == "judged"
    for head in [(1, 0), (2, 0), (3, 0), (3, 1)]:
        assert s.loc[head, "score"] == 0.5 and s.loc[head, "judged"] == "no pattern"  # Unclear: not verified
        # the copy description picks none of a random head's own rows (only other heads' copy rows among negatives)
        assert s.loc[head, "control_score"] <= 0.5
    assert np.isnan(s.loc[(0, 0), "control_score"])  # no other head has a pattern to borrow
    summary = TS.detection_summary(s.reset_index())
    assert summary.share_verified.iloc[0] == pytest.approx(1 / 5)


def test_the_llm_judge_through_a_scripted_server(scripted, tmp_path):  # noqa: F811
    llm = {(0, 0): "Copies the input word.", (1, 0): "Maps words to fruit names."}
    res = _result(HEAD_KINDS, llm=llm)
    srv = scripted(*[("judge",)] * 10)
    d = DR.Describer(DR.Endpoint("server", "scripted-model", srv.url), tmp_path / "cache.jsonl", concurrency=1)
    det = T.score_descriptions(res, d, run=RunOptions(seed=0, results_dir=tmp_path, progress=False))
    s = det.scores[det.scores.describer == "llm"].set_index(["layer", "head"])
    # the scripted judge selects the rows whose input reappears among its outputs, whatever the description: on the
    # copy head's rows exactly its own; on a random head's rows only negatives (other heads' copy rows)
    assert s.loc[(0, 0), "score"] == 1.0 and s.loc[(0, 0), "control_head"] == "1.0"
    assert s.loc[(1, 0), "score"] < 0.5 and s.loc[(1, 0), "control_head"] == "0.0"
    # a judge that ignores the description scores the shuffled control the same: no gap
    assert (s[s.has_pattern].eval("score - control_score") == 0).all()
    assert (s.drop(index=[(0, 0), (1, 0)]).judged == "no pattern").all()
    assert len(srv.requests) == 7  # two descriptions, and a control on each head's rows; Unclear costs no call
    prompt = srv.requests[0]["body"]["messages"][0]["content"]
    assert "Copies the input word." in prompt and '"matching_rows"' in prompt and prompt.count("\n1. ") == 1
    files = {p.name for p in (tmp_path / "hand-made").iterdir()}
    assert {"detection.csv", "detection.summary.csv", "detection.manifest.json"} <= files
    again = T.score_descriptions(res, d,
                                 run=RunOptions(seed=0, results_dir=None, progress=False))  # replayed from the cache
    assert len(srv.requests) == 7
    pd.testing.assert_frame_equal(again.scores, det.scores)
    q = det.by_quartile()
    assert q.n_heads.tolist() == [1, 1, 1, 2] and q.verified_llm.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_agreement_with_people():
    scores = pd.DataFrame({"describer": "llm", "layer": [0, 1, 2, 3], "head": 0, "score": [0.9, 0.8, 0.5, 0.6]})
    ann = pd.DataFrame({"annotator": "a", "item": ["i1", "i2", "i3", "i4"], "layer": [0, 1, 2, 3], "head": 0,
                        "pattern_observable": "yes", "describer_answer": "pattern",
                        "description_correct": ["correct", "incorrect", "incorrect", "correct"]})
    out = AG.detection_vs_people(scores, ann).iloc[0]
    assert out.answers == 4 and out.correct == 2
    assert out.auc == pytest.approx(0.75)  # 0.9 beats both; 0.6 beats 0.5 only
    assert out.agreement == 0.5  # verified (>= 0.75): 0, 1 ; correct: 0, 3


@pytest.mark.embedded
def test_the_local_judge_reads_yes_no_margins_and_reuses_the_rows(smollm2, model_cache):
    from maps_utils.describe.local_llm import LocalLLM

    res = _result(HEAD_KINDS)
    rows = T.evidence_rows(res.evidence, res.ops, seed=0)[(0, 0)]
    first = T.judge_prompt(rows, "words", "Copies the input word.", answer="lines")
    second = T.judge_prompt(rows, "words", "Maps words to colours.", answer="lines")
    eng = LocalLLM("smollm2-135m", cache_dir=model_cache)
    a = json.loads(eng.judge(first, len(rows))["content"])["margins"]
    b = json.loads(eng.judge(second, len(rows))["content"])["margins"]  # reuses the rows' KV cache
    assert len(a) == len(b) == 50 and a != b
    fresh = LocalLLM("smollm2-135m", cache_dir=model_cache)
    b_fresh = json.loads(fresh.judge(second, len(rows))["content"])["margins"]
    np.testing.assert_allclose(b, b_fresh, atol=0.02)  # the reused prefix changes nothing (up to batch order)
