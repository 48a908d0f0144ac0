"""Human study: material, annotation files, the annotator widget, and the statistics against hand-computed values.

Annotation files here are small fixtures written by the tests themselves; nothing in the package produces judgments.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from maps_utils.core import io as IO
from maps_utils.describe import sampling as SA
from maps_utils.describe.pipeline import DescriptionResult
from maps_utils.human import agreement as AG
from maps_utils.human import annotations as AN
from maps_utils.human import annotator as AT
from maps_utils.human import material as HS
from maps_utils.human import questions as Q

N_LAYERS, N_HEADS = 8, 2  # quartiles of 2 layers, 4 heads each


def write_descriptions(folder, n_layers=N_LAYERS, n_heads=N_HEADS):
    """A descriptions folder in notebook 04's format (written by DescriptionResult.write), 16 heads."""
    rows, ops = [], []
    for la in range(n_layers):
        for h in range(n_heads):
            i = la * n_heads + h
            kind = ["pattern", "unclear", "pattern", "unparsed", "pattern", "failed", "pattern", "unclear"][i % 8]
            rows.append({"layer": la, "head": h, "quartile": la * 4 // n_layers, "salient_tokens": f"t{i}, u{i}",
                         "top_saliency": 1.0, "has_pattern": kind == "pattern",
                         "pattern": {"pattern": f"Maps t{i} to itself.", "unclear": "Unclear"}.get(kind, ""),
                         "inputs": "Words." if kind == "pattern" else "", "reasoning": "",
                         "parse": {"unparsed": "unparsed", "failed": "failed"}.get(kind, "json"),
                         "status": "failed" if kind == "failed" else "ok", "error": "", "raw": "",
                         "describer": "tiny (test)"})
            for rank, tok in enumerate([f" t{i}", f"u{i}\n" if i % 2 else f"u{i}\r"]):  # \r: written unquoted
                ops.append({"layer": la, "head": h, "quartile": la * 4 // n_layers, "rank": rank, "token_id": rank,
                            "token": tok, "saliency": 2.0 - rank, "mapping_ids": [1, 2], "mappings": [tok, tok.upper()]})
    manifest = {"model": {"model": "tiny-model", "architecture": {"n_layers": n_layers}}}
    DescriptionResult("tiny-model", pd.DataFrame(ops), pd.DataFrame(rows), manifest, n_layers).write(folder)
    return folder / "tiny-model" / "descriptions.csv"


@pytest.fixture
def material(tmp_path):
    return HS.build_material(write_descriptions(tmp_path), n=8, seed=0)


# ---- material ---------------------------------------------------------------------------------------
def test_sheets_carry_the_executable_description_beside_the_llms(tmp_path):
    path = write_descriptions(tmp_path)
    ex = pd.DataFrame([{"layer": la, "head": h, "sentence": f"The head copies t{la * N_HEADS + h}.", "score": 0.9,
                        "verified": la % 2 == 0} for la in range(N_LAYERS) for h in range(N_HEADS)])
    ex.to_csv(path.with_name("descriptions.executable.csv"), index=False)
    m = HS.build_material(path, n=8, seed=0)
    assert list(m.items.columns) == ["item", "material", "operations", "description", "executable_description"]
    for item, key in zip(m.items.itertuples(), m.key.itertuples(), strict=True):
        assert item.executable_description == f"The head copies t{key.layer * N_HEADS + key.head}."
        assert key.executable_verified == (key.layer % 2 == 0) and key.executable_score == 0.9
    plain = HS.build_material(write_descriptions(tmp_path / "plain"), n=8, seed=0)
    assert "executable_description" not in plain.items.columns and plain.key.executable_score.isna().all()
    assert list(plain.key.layer) == list(m.key.layer)  # the same items, in the same order
    # the material hash covers what annotators read, the executable description included
    assert set(m.items.material).isdisjoint(plain.items.material)


def test_material_is_stratified_seeded_shuffled_and_blind(tmp_path, material):
    assert material.key.quartile.value_counts().sort_index().tolist() == [2, 2, 2, 2]
    assert list(material.items.columns) == ["item", "material", "operations", "description"]  # no head, layer, describer
    assert material.items.item.tolist() == [f"item-{i:03d}" for i in range(1, 9)]
    assert material.key.quartile.tolist() != sorted(material.key.quartile)  # shuffled
    again = HS.build_material(tmp_path / "tiny-model" / "descriptions.csv", n=8, seed=0)
    pd.testing.assert_frame_equal(again.key, material.key)
    other = HS.build_material(tmp_path / "tiny-model", n=8, seed=1)
    assert set(zip(other.key.layer, other.key["head"], strict=True)) != set(
        zip(material.key.layer, material.key["head"], strict=True))
    assert len(HS.build_material(tmp_path / "tiny-model", n=None).items) == 16
    first = material.items.iloc[0]
    assert first.operations.splitlines()[0].startswith(" t") and "\\n" in first.operations  # shown as in the prompt


def test_what_annotators_read_as_the_description(material):
    by_kind = dict(zip(material.key.parse + "/" + material.key.status, material.items.description, strict=True))
    for k, text in by_kind.items():
        if k.startswith("failed") or k.startswith("unparsed"):
            assert text == HS.NO_ANSWER
    texts = set(material.items.description)
    assert "Unclear" in texts and any(t.startswith("Maps t") and "(inputs: Words.)" in t for t in texts)


def test_sheets_differ_in_order_and_read_back_as_empty_annotations(tmp_path, material):
    out = material.write(tmp_path / "study", ["ann-a", "ann-b"], seed=0)
    a = pd.read_csv(out / "sheets" / "ann-a.csv")
    b = pd.read_csv(out / "sheets" / "ann-b.csv")
    assert set(a.item) == set(b.item) == set(material.items.item) and a.item.tolist() != b.item.tolist()
    assert (out / "key.csv").is_file() and (out / "items.csv").is_file()
    read = AN.read_annotations(out / "sheets" / "ann-a.csv", material)  # a blank sheet is a valid file
    assert len(read) == 8 and not read.apply(AN.is_complete, axis=1).any()
    with pytest.raises(AN.AnnotationError, match="use letters, digits"):
        material.sheet("../evil")


def test_missing_descriptions_say_what_to_run(tmp_path):
    with pytest.raises(HS.MapsError, match="run notebook 04"):
        HS.build_material(tmp_path / "nothing" / "descriptions.csv")


# ---- annotation files -------------------------------------------------------------------------------
def _write(path, rows, columns=("item", "pattern_observable", "description_correct", "operation_kind")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def test_validation_errors_name_the_problem(tmp_path, material):
    f = tmp_path / "x.csv"
    with pytest.raises(AN.AnnotationError, match=r"row 3 \(item-002\): pattern_observable='maybe' is not one of yes, no"):
        AN.read_annotations(_write(f, [("item-001", "yes", "correct", "semantic"), ("item-002", "maybe", "correct", "")]))
    with pytest.raises(AN.AnnotationError, match="operation_kind='syntax' is not one of semantic"):
        AN.read_annotations(_write(f, [("item-001", "yes", "correct", "syntax")]))
    with pytest.raises(AN.AnnotationError, match="item-001 appear more than once"):
        AN.read_annotations(_write(f, [("item-001", "yes", "correct", "semantic"), ("item-001", "no", "correct", "")]))
    with pytest.raises(AN.AnnotationError, match="unknown item.*item-999"):
        AN.read_annotations(_write(f, [("item-999", "yes", "correct", "semantic")]), material)
    with pytest.raises(AN.AnnotationError, match="missing column.*description_correct"):
        AN.read_annotations(_write(f, [("item-001", "yes")], columns=("item", "pattern_observable")))
    stale = [("item-001", "deadbeef0000", "yes", "correct", "semantic")]
    with pytest.raises(AN.AnnotationError, match="answered on different material"):
        AN.read_annotations(_write(f, stale, ("item", "material", "pattern_observable", "description_correct",
                                              "operation_kind")), material)
    with pytest.raises(AN.AnnotationError, match="leave the kind empty when pattern_observable is no"):
        AN.read_annotations(_write(f, [("item-001", "no", "correct", "semantic")]))
    with pytest.raises(AN.AnnotationError, match="have answers but no material hash"):
        AN.read_annotations(_write(f, [("item-001", "yes", "correct", "semantic")]), material)
    f.write_text("")
    with pytest.raises(AN.AnnotationError, match="is empty; remove it"):
        AN.read_annotations(f)
    f.write_text("item,material,pattern_observable,description_correct,operation_kind\n")
    assert AN.read_annotations(f, material).empty  # a header alone is a valid, empty file
    mat = material.items.material.tolist()
    ok = AN.read_annotations(_write(f, [("item-001", mat[0], " YES ", "Correct", "semantic"), ("", "", "", "", "")],
                                    ("item", "material", "pattern_observable", "description_correct", "operation_kind")),
                             material)
    assert ok.pattern_observable.tolist() == ["yes"] and ok.description_correct.tolist() == ["correct"]  # blank row dropped


def test_store_saves_each_answer_and_resumes(tmp_path, material):
    path = tmp_path / "ann" / "alice.csv"
    store = AN.AnnotationStore(path, material)
    store.answer("item-003", pattern_observable="yes")
    assert path.is_file() and not store.complete("item-003")
    store.answer("item-003", description_correct="partially", operation_kind="semantic", comment="half, the lines")
    store.answer("item-001", pattern_observable="no", description_correct="correct")
    back = AN.AnnotationStore(path, material)
    assert back.complete("item-003") and back.complete("item-001")
    assert back.rows["item-003"]["comment"] == "half, the lines"
    assert back.rows["item-003"]["material"] == material.items.set_index("item").material["item-003"]
    with pytest.raises(AN.AnnotationError, match="use one of yes, no"):
        back.answer("item-002", pattern_observable="maybe")
    with pytest.raises(AN.AnnotationError, match="not an item of this study"):
        back.answer("item-099", pattern_observable="yes")
    back.answer("item-003", pattern_observable="no")  # no pattern: the kind given earlier goes
    assert AN.AnnotationStore(path, material).rows["item-003"]["operation_kind"] == ""


def test_two_views_of_one_file_keep_each_others_answers(tmp_path, material):
    path = tmp_path / "ann" / "erin.csv"
    one, two = AN.AnnotationStore(path, material), AN.AnnotationStore(path, material)
    one.answer("item-001", pattern_observable="no", description_correct="correct")
    two.answer("item-002", pattern_observable="no", description_correct="incorrect")
    assert set(AN.AnnotationStore(path, material).rows) == {"item-001", "item-002"}


_ANSWER_MANY = """
import sys, time
from pathlib import Path
from maps_utils.human import annotations as AN
from maps_utils.human import material as HS
from maps_utils.human import questions as Q
descriptions, path, ready, go, *items = sys.argv[1:]
store = AN.AnnotationStore(path, HS.build_material(descriptions, n=None, seed=0))
write = AN.atomic_write_text
def slow_write(*args):  # a slow disk: widens the read-merge-write window, so unlocked saves would overlap
    time.sleep(0.01)
    return write(*args)
AN.atomic_write_text = slow_write
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
for field, value in (("pattern_observable", "no"), ("description_correct", "correct")):  # two saves per item
    for item in items:
        store.answer(item, **{field: value})
"""


def test_two_processes_answering_at_once_keep_all_answers(tmp_path):
    """Two views of one annotator in two processes, saving interleaved: every answer of both is in the file."""
    descriptions = write_descriptions(tmp_path, n_layers=8, n_heads=5)
    material = HS.build_material(descriptions, n=None, seed=0)
    items = material.items.item.tolist()
    assert len(items) == 40
    path, go = tmp_path / "ann" / "gina.csv", tmp_path / "go"
    halves = {"a": items[0::2], "b": items[1::2]}  # 20 distinct items each
    procs = [subprocess.Popen([sys.executable, "-c", _ANSWER_MANY, str(descriptions), str(path),
                               str(tmp_path / f"ready-{k}"), str(go), *half], stderr=subprocess.PIPE, text=True)
             for k, half in halves.items()]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{k}").exists() for k in halves) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.02)
    go.touch()  # both start answering together
    for p in procs:
        assert p.wait(timeout=120) == 0, p.communicate()[1][-2000:]
    saved = AN.read_annotations(path, material)
    assert sorted(saved.item) == sorted(items) and saved.apply(AN.is_complete, axis=1).all()
    assert [p.name for p in path.parent.iterdir() if ".partial-" in p.name] == []


def test_a_save_merges_with_the_file_and_the_latest_answer_wins(tmp_path, material):
    path = tmp_path / "ann" / "hana.csv"
    one, two = AN.AnnotationStore(path, material), AN.AnnotationStore(path, material)
    one.answer("item-001", pattern_observable="yes")
    two.answer("item-001", pattern_observable="no")  # later: wins
    one.answer("item-002", pattern_observable="yes")  # one's stale copy of item-001 does not overwrite two's answer
    back = AN.AnnotationStore(path, material).rows
    assert back["item-001"]["pattern_observable"] == "no" and back["item-002"]["pattern_observable"] == "yes"
    assert one.rows["item-001"]["pattern_observable"] == "no"  # the view caught up
    # an answer this view holds but the file lacks (the file was replaced meanwhile) is written back by save()
    two.rows["item-003"] = one.rows["item-002"] | {"item": "item-003", "annotated_at": "2020-01-01T00:00:00+00:00",
                                                   "material": material.items.set_index("item").material["item-003"]}
    two.save()
    assert set(AN.AnnotationStore(path, material).rows) == {"item-001", "item-002", "item-003"}


@pytest.mark.parametrize("name", ["alice\n", " alice", "alice ", "a/b", "", "../evil", "-x", "a" * 65, "é"])
def test_bad_annotator_names_are_refused_in_one_sentence(name):
    with pytest.raises(AN.AnnotationError) as err:
        Q.check_annotator(name)
    msg = str(err.value)
    assert "use letters, digits, '_', '-' or '.' only" in msg and "\n" not in msg and msg.count(". ") == 0


@pytest.mark.parametrize("name", ["alice", "Bob_2", "ann-a", "x.y", "a" * 64, "7"])
def test_good_annotator_names_pass(name):
    assert Q.check_annotator(name) == name


def test_writing_the_material_never_overwrites_a_sheet_with_answers(tmp_path, material):
    out = material.write(tmp_path / "study", ["fred"], seed=0)
    sheet = out / "sheets" / "fred.csv"
    filled = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    filled.loc[0, "pattern_observable"] = "no"
    filled.to_csv(sheet, index=False)
    material.write(tmp_path / "study", ["fred"], seed=0)
    assert pd.read_csv(sheet, dtype=str, keep_default_na=False).loc[0, "pattern_observable"] == "no"


def test_an_annotator_called_pooled_does_not_replace_the_pooled_row(tmp_path, material):
    ann = AN.load_annotations(_fixture_annotations(tmp_path / "ann", material, {"pooled": A, "b": B}), material)
    r = AG.rates(ann)
    assert r.loc["pooled", "pattern_yes"] == pytest.approx(5 / 8) and r.loc[AG.POOLED, "pattern_yes"] == pytest.approx(9 / 16)


def test_a_crash_mid_write_keeps_the_earlier_file(tmp_path, material, monkeypatch):
    path = tmp_path / "ann" / "bob.csv"
    store = AN.AnnotationStore(path, material)
    store.answer("item-001", pattern_observable="yes", description_correct="correct", operation_kind="semantic")
    before = path.read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt("power cut during rename")

    monkeypatch.setattr(IO.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.answer("item-002", pattern_observable="no", description_correct="correct")
    monkeypatch.undo()
    assert path.read_bytes() == before
    left = sorted(p.name for p in path.parent.iterdir())
    assert left == [".bob.csv.lock", "bob.csv"]  # no temporary file left behind (the lock file stays, empty)
    assert set(AN.AnnotationStore(path, material).rows) == {"item-001"}


# ---- statistics --------------------------------------------------------------------------------------
def test_cohen_kappa_by_hand():
    a = ["yes"] * 5 + ["no"] * 5
    b = ["yes"] * 4 + ["no"] * 5 + ["yes"]
    # p_o = 8/10, p_e = .5*.5 + .5*.5 = .5, kappa = (.8 - .5) / .5 = .6
    assert AG.cohen_kappa(a, b) == pytest.approx(0.6)
    assert AG.cohen_kappa(a, a) == pytest.approx(1.0)
    assert np.isnan(AG.cohen_kappa(["yes"] * 3, ["yes"] * 3))  # chance agreement 1: undefined
    # 3 categories: p_o = 4/6; marginals a = (3, 2, 1)/6, b = (2, 2, 2)/6; p_e = (6 + 4 + 2)/36 = 1/3; kappa = .5
    assert AG.cohen_kappa(list("aaabbc"), list("aabbcc")) == pytest.approx(0.5)


def test_fleiss_kappa_by_hand():
    # 4 items, 3 raters, 2 categories: P_i = 1, 1, 1/3, 1/3 -> mean 2/3; p_j = .5, .5 -> P_e = .5; kappa = 1/3
    assert AG.fleiss_kappa([[3, 0], [0, 3], [2, 1], [1, 2]]) == pytest.approx(1 / 3)
    # the textbook example (Fleiss 1971 layout as in most references): 10 items, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert AG.fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)
    with pytest.raises(ValueError, match="same number"):
        AG.fleiss_kappa([[2, 0], [1, 2]])


def _fixture_annotations(folder, material, answers):
    """answers: {annotator: [(pattern, correct, kind), ...]} over the material's items in id order."""
    folder.mkdir(parents=True, exist_ok=True)
    items = material.items.item.tolist()
    for name, rows in answers.items():
        store = AN.AnnotationStore(folder / f"{name}.csv", material)
        for item, (p, c, k) in zip(items, rows, strict=False):
            store.answer(item, pattern_observable=p, description_correct=c, operation_kind=k)
    return folder


# The fixture material (seed 0, 8 of the 16 heads) pins which items the describer gave a pattern for:
DESCRIBER = ["none", "none", "pattern", "pattern", "pattern", "pattern", "none", "unclear"]  # items 1..8
A = [("yes", "correct", "semantic"), ("yes", "correct", "semantic"), ("yes", "partially", "algorithmic-string"),
     ("no", "correct", ""), ("no", "incorrect", ""), ("yes", "incorrect", "other"), ("no", "correct", ""),
     ("yes", "correct", "semantic")]
B = [("yes", "correct", "semantic"), ("no", "correct", ""), ("yes", "partially", "algorithmic-string"),
     ("no", "correct", ""), ("no", "incorrect", ""), ("yes", "correct", "other"), ("no", "correct", ""),
     ("yes", "partially", "lexical-morphological")]
C = [("yes", "correct", "semantic"), ("yes", "correct", "semantic"), ("yes", "partially", "algorithmic-string"),
     ("yes", "correct", "other"), ("no", "incorrect", ""), ("no", "correct", ""), ("no", "correct", ""),
     ("no", "correct", "")]


def test_fixture_material_is_as_the_hand_computations_assume(material):
    assert material.key.describer_answer.tolist() == DESCRIBER
    assert material.key.quartile.tolist() == [1, 2, 1, 3, 2, 0, 0, 3]


def test_rates_quartiles_and_agreement_on_fixture_files(tmp_path, material):
    ann = AN.load_annotations(_fixture_annotations(tmp_path / "ann", material, {"a": A, "b": B}), material)
    assert len(ann) == 16 and set(ann.annotator) == {"a", "b"}
    r = AG.rates(ann)
    assert r.loc["a", "pattern_yes"] == pytest.approx(5 / 8) and r.loc["b", "pattern_yes"] == pytest.approx(4 / 8)
    # correctness counts only items the describer gave a pattern for (3-6): a = P C I I, b = P C I C
    assert r.loc["a", "described_answers"] == 4
    assert r.loc["a", ["correct", "partially", "incorrect"]].tolist() == pytest.approx([1 / 4, 1 / 4, 2 / 4])
    assert r.loc["b", ["correct", "partially", "incorrect"]].tolist() == pytest.approx([2 / 4, 1 / 4, 1 / 4])
    assert r.loc[AG.POOLED, ["correct", "partially", "incorrect"]].tolist() == pytest.approx([3 / 8, 2 / 8, 3 / 8])
    assert r.loc["a", "kind:semantic"] == pytest.approx(3 / 5)  # a's kinds: items 1, 2, 3, 6, 8
    assert r.loc[AG.POOLED, "kind:semantic"] == pytest.approx(4 / 9)
    # quartiles of the described items: 6 -> Q1, 3 -> Q2, 5 -> Q3, 4 -> Q4
    qt = SA.quartile_table(AG.answered(ann, "description_correct"), "description_correct", Q.CORRECTNESS, N_LAYERS)
    assert qt.n.tolist() == [2, 2, 2, 2]
    assert qt[list(Q.CORRECTNESS)].to_numpy().tolist() == [[0.5, 0, 0.5], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    agree = AG.kappa_by_question(ann, n_boot=200, seed=3).set_index("question")
    # pattern: a = y y y n n y n y, b = y n y n n y n y -> p_o = 7/8; p_e = (5/8)(4/8) + (3/8)(4/8) = 1/2 -> 0.75
    assert agree.loc["pattern_observable", "kappa"] == pytest.approx(0.75)
    assert agree.loc["pattern_observable", "raw_agreement"] == pytest.approx(7 / 8)
    assert agree.loc["pattern_observable", "method"] == "Cohen" and agree.loc["pattern_observable", "items"] == 8
    # correctness on items 3-6: p_o = 3/4; p_e = (1/4)(2/4) + (1/4)(1/4) + (2/4)(1/4) = 5/16 -> (12 - 5) / 11
    assert agree.loc["description_correct", "items"] == 4
    assert agree.loc["description_correct", "kappa"] == pytest.approx(7 / 11)
    # kind: items both call a pattern with a kind: 1, 3, 6, 8 -> agree on 3 of 4
    assert agree.loc["operation_kind", "items"] == 4 and agree.loc["operation_kind", "raw_agreement"] == 0.75
    lo, hi = agree.loc["pattern_observable", ["ci_low", "ci_high"]]
    assert lo <= 0.75 <= hi and hi <= 1.0 and 0 < agree.loc["pattern_observable", "boot_valid"] <= 200
    again = AG.kappa_by_question(ann, n_boot=200, seed=3)
    pd.testing.assert_frame_equal(again.set_index("question"), agree)  # the bootstrap is seeded
    assert not AG.kappa_by_question(ann, n_boot=200, seed=4).set_index("question").equals(agree)


def test_three_annotators_use_fleiss_by_hand(tmp_path, material):
    ann = AN.load_annotations(_fixture_annotations(tmp_path / "ann", material, {"a": A, "b": B, "c": C}), material)
    agree = AG.kappa_by_question(ann, n_boot=50, seed=0).set_index("question")
    # pattern counts (yes, no) per item: 1 (3,0) 2 (2,1) 3 (3,0) 4 (1,2) 5 (0,3) 6 (2,1) 7 (0,3) 8 (2,1)
    # mean P_i = (4 * 1 + 4 * 1/3) / 8 = 2/3; p_yes = 13/24; P_e = (169 + 121) / 576; kappa = 94 / 286
    assert agree.loc["pattern_observable", "method"] == "Fleiss" and agree.loc["pattern_observable", "annotators"] == 3
    assert agree.loc["pattern_observable", "kappa"] == pytest.approx(94 / 286)


def test_agreement_with_an_annotator_who_never_sees_a_pattern(tmp_path, material):
    never = [("no", "correct", "")] * 8
    ann = AN.load_annotations(_fixture_annotations(tmp_path / "ann", material, {"a": A, "d": never}), material)
    agree = AG.kappa_by_question(ann, n_boot=20, seed=0).set_index("question")
    assert agree.loc["operation_kind", "annotators"] == 1 and np.isnan(agree.loc["operation_kind", "kappa"])
    assert agree.loc["pattern_observable", "method"] == "Cohen"
    # with three annotators of whom one never sees a pattern, the kind question is Cohen's on the other two
    ann3 = AN.load_annotations(_fixture_annotations(tmp_path / "ann3", material, {"a": A, "b": B, "d": never}), material)
    kind = AG.kappa_by_question(ann3, n_boot=20, seed=0).set_index("question").loc["operation_kind"]
    assert kind["method"] == "Cohen" and kind["annotators"] == 2 and kind["items"] == 4


def test_describer_against_people_by_hand(tmp_path, material):
    ann = AN.load_annotations(_fixture_annotations(tmp_path / "ann", material, {"a": A}), material)
    vs = AG.describer_vs_people(ann).loc["a"]
    # usable items 3, 4, 5, 6 (pattern) and 8 (Unclear); a says yes on 3, 6, 8 and no on 4, 5; items 1, 2, 7 left out
    assert (vs["items"], vs.no_answer) == (5, 3)
    assert (vs.both_pattern, vs.describer_only, vs.people_only, vs.both_none) == (2, 2, 1, 0)
    assert vs.agreement == pytest.approx(2 / 5)
    # describer yes x4 / no x1, a yes x3 / no x2: p_e = (4/5)(3/5) + (1/5)(2/5) = 14/25; kappa = (10 - 14) / 11
    assert vs.kappa == pytest.approx(-4 / 11)


def test_partial_answers_count_where_they_answer(tmp_path, material):
    folder = tmp_path / "ann"
    store = AN.AnnotationStore(folder / "a.csv", material)
    store.answer("item-003", pattern_observable="yes", description_correct="correct")  # no kind yet
    store.answer("item-004", pattern_observable="no")
    ann = AN.load_annotations(folder, material)
    r = AG.rates(ann).loc["a"]
    assert r.pattern_answers == 2 and r.pattern_yes == 0.5 and r.described_answers == 1 and r.correct == 1.0
    assert r.kind_answers == 0
    assert AN.load_annotations(tmp_path / "none", material).empty


# ---- the widget, driven from code ---------------------------------------------------------------------
def test_annotator_saves_every_click_and_resumes(tmp_path, material):
    folder = tmp_path / "ann"
    tool = AT.Annotator(material, "carol", folder, seed=0)
    first = tool.item
    assert tool.pos == 0 and tool.progress.value == 0 and first in tool.title.value
    assert "Answer the first question to see the description" in tool.description.value
    tool.buttons["pattern_observable"].value = "yes"
    assert "Description:" in tool.description.value
    tool.buttons["operation_kind"].value = "semantic"
    tool.buttons["pattern_observable"].value = "no"  # changing one's mind clears the kind, in the view and the file
    assert tool.buttons["operation_kind"].disabled and tool.buttons["operation_kind"].value is None
    tool.buttons["description_correct"].value = "correct"
    saved = pd.read_csv(folder / "carol.csv", dtype=str, keep_default_na=False)
    assert saved.set_index("item").loc[first, ["pattern_observable", "description_correct", "operation_kind"]].tolist() == [
        "no", "correct", ""]
    assert tool.progress.value == 1
    tool.next_button.click()
    second = tool.item
    tool.buttons["pattern_observable"].value = "yes"  # half-answered
    tool.comment.value = "looks like plurals"
    # a new session (kernel restart) resumes at the first unanswered item, with the half answer shown
    again = AT.Annotator(material, "carol", folder, seed=0)
    assert again.item == second and again.buttons["pattern_observable"].value == "yes"
    assert again.comment.value == "looks like plurals" and not again.buttons["operation_kind"].disabled
    again.back_button.click()
    assert again.item == first and again.buttons["description_correct"].value == "correct"
    again.buttons["description_correct"].value = "incorrect"  # changing an answer rewrites it, nothing else
    rows = pd.read_csv(folder / "carol.csv", dtype=str, keep_default_na=False).set_index("item")
    assert rows.loc[first, "description_correct"] == "incorrect" and rows.loc[second, "comment"] == "looks like plurals"
    assert len(rows) == 2
    # the saved file is a valid annotation file for the analysis (the half-answered item counts where it answers)
    assert AN.load_annotations(folder, material)["item"].tolist() == [first, second]


def test_material_manifest_names_the_describer(material):
    params = material.manifest["parameters"]
    assert params["describer"] == ["tiny (test)"] and params["n_items"] == 8 and json.dumps(material.manifest)
