"""Tests for the rule describer (maps_utils.describe.rules): predicates, row descriptions and per-head tables."""

from __future__ import annotations

import json
import random
import string

import pandas as pd
import pytest

from maps_utils import relations
from maps_utils.describe.rules import (
    UNCLEAR,
    describe_inputs,
    describe_ops,
    describe_rows,
    normalise,
    predicate_library,
    row_holds,
)

WORDS = ["apple", "river", "candle", "garden", "window", "forest", "pencil", "bottle",
         "market", "silver", "mirror", "ladder", "carpet", "basket", "helmet"]
FILLER = [" xylophone", " quartz", " jumbo"]


@pytest.fixture(scope="module")
def capitals() -> relations.Relation:
    return relations.load("country_capital")


@pytest.fixture(scope="module")
def library(capitals) -> list:
    return predicate_library([capitals])


@pytest.fixture(scope="module")
def preds(library) -> dict:
    return {p.name: p for p in library}


def copy_rows(words=WORDS) -> list[tuple[str, list[str]]]:
    return [(w, [" " + w, w.upper(), *FILLER]) for w in words]


def random_rows(n: int = 15, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)

    def word() -> str:
        return " " + "".join(rng.choice(string.ascii_lowercase) for _ in range(7))

    return [(word(), [word() for _ in range(5)]) for _ in range(n)]


def test_normalise_strips_markers_and_case():
    assert [normalise(t) for t in (" Paris", "▁Paris", "ĠParis", "PARIS", "\tParis\n")] == ["paris"] * 5
    assert normalise("▁") == "" and normalise(" ") == ""


@pytest.mark.parametrize("name, source, target, expected", [
    ("copy", " Paris", "paris", True), ("copy", "▁HELLO", " hello", True), ("copy", " Paris", " Pari", False),
    ("copy", " ", " ", False),
    ("first_letter", " Paris", " P", True), ("first_letter", " Paris", " q", False),
    ("first_letter", " P", " p", False), ("first_letter", " Paris", " 1", False),
    ("same_first_letter", " Paris", " pizza", True), ("same_first_letter", " Paris", " paris", False),
    ("same_first_letter", " Paris", " p", False), ("same_first_letter", " 12", " 19", False),
    ("shared_prefix", " playing", " player", True), ("shared_prefix", " play", " plot", False),
    ("shared_prefix", " play", " Play", False),
    ("shared_suffix", " running", " jumping", True), ("shared_suffix", " cat", " hat", False),
    ("inflection", " walk", " walked", True), ("inflection", " mouse", " mice", True),
    ("inflection", " go", " went", True), ("inflection", " walk", " table", False),
    ("inflection", " walk", " walk", False), ("inflection", " 12", " 12s", False),
    ("numeric_successor", " 1999", " 2000", True), ("numeric_successor", " 1999", " 1998", False),
    ("numeric_successor", " 7", " eight", False), ("numeric_successor", "▁9", "10", True),
    ("relation:country_capital", " France", " Paris", True),
    ("relation:country_capital", "▁france", "PARIS", True),
    ("relation:country_capital", " France", " Berlin", False),
    ("relation:country_capital", " Paris", " France", False),
])
def test_predicates(preds, name, source, target, expected):
    assert preds[name].test(source, target) is expected


def test_library_skips_duplicate_relations_and_names_every_relation():
    all_relations = relations.load_all()
    names = [p.name for p in predicate_library(all_relations)]
    assert names[:7] == ["copy", "first_letter", "same_first_letter", "shared_prefix", "shared_suffix",
                         "inflection", "numeric_successor"]
    assert len(names) == 7 + len(all_relations) - 3 and len(set(names)) == len(names)
    assert "relation:country_capital" in names
    assert not {"relation:copying", "relation:name_copying", "relation:word_first_letter"} & set(names)
    sentence = {p.name: p.sentence for p in predicate_library(all_relations)}["relation:country_capital"]
    assert "country_capital" in sentence and "capital" in sentence.replace("country_capital", "")


def test_row_holds_any_mapping(preds):
    assert row_holds(preds["copy"], " cat", [" dog", " tree", " Cat"])
    assert not row_holds(preds["copy"], " cat", [" dog", " tree"])
    assert not row_holds(preds["copy"], " cat", [])
    with pytest.raises(TypeError):
        row_holds(preds["copy"], " cat", " cat")


def test_copy_head(library):
    desc = describe_rows(copy_rows(), library)
    assert desc.predicates == ("copy",)
    assert desc.shares["copy"] == 1.0 and set(desc.shares) == {p.name for p in library}
    assert "cop" in desc.pattern and "100%" in desc.pattern
    assert desc.inputs.startswith("Mostly lower-case words (15/15 inputs)")
    assert desc.follows("Table", [" table", " chair"]) is True
    assert desc.follows(" cat", [" dog", " tree", " house"]) is False


def test_capital_head(library, capitals):
    pairs = [(s, t) for s, t in capitals.pairs if s.isalpha() and t.isalpha()][:15]
    assert len(pairs) == 15
    rows = [(" " + s, [" table", " seven", " " + t, " ocean", " blue"]) for s, t in pairs]
    desc = describe_rows(rows, library)
    assert desc.predicates[0] == "relation:country_capital"
    assert desc.shares["relation:country_capital"] == 1.0 and desc.shares["copy"] == 0.0
    assert "country_capital" in desc.pattern
    assert desc.inputs.startswith("Mostly capitalised words (15/15 inputs)")
    assert desc.follows(" Germany", [" Berlin"]) and not desc.follows(" Germany", [" Paris"])


def test_random_head_is_unclear(library):
    rows = random_rows()
    desc = describe_rows(rows, library)
    assert desc.predicates == () and desc.pattern == UNCLEAR
    assert max(desc.shares.values()) < 0.5
    assert not any(desc.follows(s, ms) for s, ms in rows + copy_rows())


def test_min_share_boundary(library):
    rows = copy_rows(WORDS[:5]) + random_rows(5, seed=1)
    assert describe_rows(rows, library).shares["copy"] == 0.5
    assert describe_rows(rows, library, min_share=0.5).predicates == ("copy",)
    assert describe_rows(rows, library, min_share=0.51).predicates == ()
    with pytest.raises(ValueError):
        describe_rows(rows, library, min_share=0)


def test_chosen_order_is_share_then_library(library):
    # copy holds in 4/4 rows; same_first_letter and shared_prefix in 3/4 (via " applexyz" etc.)
    words = ["apple", "river", "candle", "garden"]
    rows = [(w, [" " + w, " " + w + "xyz" if i < 3 else " zzz"]) for i, w in enumerate(words)]
    desc = describe_rows(rows, library)
    assert desc.shares["copy"] == 1.0 and desc.shares["shared_prefix"] == 0.75
    assert desc.predicates == ("copy", "same_first_letter", "shared_prefix")


def test_describe_rows_empty_raises(library):
    with pytest.raises(ValueError, match="at least one"):
        describe_rows([], library)


@pytest.mark.parametrize("sources, expected", [
    ([" 12", " 1999", "3", " 4.5"], "Mostly numbers (4/4 inputs)."),
    (["ing", "ED", "Tion", "ment", " 42"], "Mostly word pieces without a leading space (4/5 inputs)."),
    (["ing", "ed", "tion", " The"],
     "Mostly lower-case words (3/4 inputs); mostly word pieces without a leading space (3/4 inputs)."),
    ([" a", ",", " ...", " cat"], "Mostly single letters/punctuation (3/4 inputs)."),
    ([" 12", ",", " cat", " Dog"], UNCLEAR),
])
def test_describe_inputs(sources, expected):
    assert describe_inputs(sources) == expected


def test_describe_ops_two_heads_and_max_rank():
    numbers = [9, 99, 999, 19, 29, 39, 49, 59, 69, 79]  # successors share no prefix with them
    succ = [(f" {n}", [" the", f" {n + 1}", " ocean"]) for n in numbers]
    mixed = copy_rows(WORDS[:3]) + random_rows(7, seed=2)  # copy only in ranks 0-2
    records = [{"layer": 2, "head": 0, "rank": r, "token": s, "mappings": ms} for r, (s, ms) in enumerate(mixed)]
    records += [{"layer": 0, "head": 3, "rank": r, "token": s, "mappings": json.dumps(ms)}
                for r, (s, ms) in enumerate(succ)]
    ops = pd.DataFrame(records[::-1])  # unsorted on purpose
    table = describe_ops(ops)
    assert list(table.columns) == ["layer", "head", "pattern", "inputs", "predicates", "top_predicate",
                                   "top_share", "has_pattern", "n_rows"]
    assert list(zip(table.layer, table["head"], strict=True)) == [(0, 3), (2, 0)]
    assert table.top_predicate.tolist() == ["numeric_successor", ""]
    assert table.n_rows.tolist() == [10, 10] and table.top_share.tolist() == [1.0, 0.0]
    assert table.has_pattern.tolist() == [True, False]
    assert json.loads(table.predicates[0])[0] == "numeric_successor"

    limited = describe_ops(ops, max_rank=3)
    assert limited.n_rows.tolist() == [3, 3]
    assert limited.top_predicate.tolist() == ["numeric_successor", "copy"]
    assert limited.top_share.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        describe_ops(ops, max_rank=0)
    with pytest.raises(ValueError, match="mappings"):
        describe_ops(ops.drop(columns="mappings"))
