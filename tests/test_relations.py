"""Relation datasets: every shipped file validates and matches its metadata; the loader's errors and filters."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maps_utils import relations as R
from maps_utils.core.errors import MapsError
from maps_utils.core.hashing import file_sha256

META = R.read_metadata()


def test_twenty_relations_in_four_categories():
    assert len(META) == 20
    by_cat = {c: R.list_relations(c) for c in R.CATEGORIES}
    assert {c: len(v) for c, v in by_cat.items()} == {"algorithmic": 5, "knowledge": 5, "linguistic": 8, "translation": 2}
    assert sum(m["multi_token"] for m in META.values()) == 11
    assert {n for n, m in META.items() if m["copying"]} == {"copying", "name_copying"}


@pytest.mark.parametrize("name", list(META))
def test_shipped_relation_validates_and_matches_metadata(name, cache):
    m = META[name]
    rel = R.load(name)
    assert rel.category == m["category"] and rel.display_name == m["display_name"]
    assert len(rel) == m["count"], "count in relations.json is stale: run generate.py --checksums"
    assert R.file_sha256(rel.path) == m["sha256"], "checksum in relations.json is stale: run generate.py --checksums"
    assert R.file_sha256 is file_sha256  # one definition (core.hashing): the hex SHA-256 of the file's bytes
    assert file_sha256(rel.path) == hashlib.sha256(rel.path.read_bytes()).hexdigest()
    assert rel.duplicate_sources == ()
    assert m["provenance"] and len(m["provenance"]) > 20
    tmpl = m["causal_template"]
    assert tmpl.count(R.PLACEHOLDER) == 1
    assert R.fill(tmpl, "X").endswith(tmpl.split(R.PLACEHOLDER)[1])


def test_generic_templates():
    t = R.read_templates()
    assert t["dynamic"] == ["No <X> means no", "The story of <X> contains", "This is a document about <X>",
                            "When I think about <X> I think about"]
    assert R.fill(t["multi_token"], "France") == "This is a document about France"
    with pytest.raises(R.RelationError, match="exactly once"):
        R.fill("no placeholder", "x")


def test_spot_checked_facts():
    """A handful of facts per relation that a wrong dataset would get wrong."""
    expect = {
        "country_capital": {"France": "Paris", "Japan": "Tokyo", "Egypt": "Cairo", "Australia": "Canberra"},
        "country_language": {"France": "French", "Brazil": "Portuguese"},
        "year_following": {"1728": "1729", "1999": "2000"},
        "adj_comparative": {"big": "bigger", "good": "better"},
        "adj_superlative": {"happy": "happiest", "bad": "worst"},
        "verb_past_tense": {"ask": "asked", "go": "went", "teach": "taught"},
        "word_homophone": {"steel": "steal", "knight": "night"},
    }
    for name, facts in expect.items():
        rel = dict(R.load(name).pairs)
        for s, t in facts.items():
            assert rel.get(s, rel.get(t)) in (t, s), (name, s)
    for name in ("copying", "name_copying"):
        assert all(s == t for s, t in R.load(name).pairs)
    for s, t in R.load("word_first_letter").pairs:
        assert t == s[0]
    for s, t in R.load("word_last_letter").pairs:
        assert t == s[-1]


# ---- loader errors, each a clear sentence ---------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"France": "Paris"}', "must be a JSON list of [source, target] pairs"),
        ("[]", "has no pairs"),
        ('[["France", "Paris"], ["Spain"]]', "item 1 (['Spain']) is not a [source, target] pair"),
        ('[["France", "Paris"], ["Spain", 7]]', "item 1 has a non-string target (7)"),
        ('[["France", "Paris"], ["  ", "Madrid"]]', "item 1 has an empty source"),
        ('[["France", "Paris"],', "not valid JSON"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(R.RelationError) as err:
        R.load(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_relation_lists_the_known_ones():
    with pytest.raises(R.RelationError) as err:
        R.load("country_to_moon")
    msg = str(err.value)
    assert "Unknown relation 'country_to_moon'" in msg and "country_capital" in msg and "word_synonym" in msg


def test_missing_file_and_bad_csv(tmp_path):
    with pytest.raises(R.RelationError, match="no such relation file"):
        R.load(tmp_path / "nothing.json")
    bad = tmp_path / "bad.csv"
    bad.write_text("from,to\na,b\n")
    with pytest.raises(R.RelationError, match="'source' and 'target' columns"):
        R.load(bad)


def test_duplicates_are_reported(tmp_path, caplog):
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([["a", "b"], ["a", "c"], ["d", "e"]]))
    rel = R.load(path)
    assert rel.duplicate_sources == ("a",)
    assert "1 duplicate sources (a)" in caplog.text


# ---- robust files: whitespace, BOM, encodings, repeated pairs, the copying flag ---------------------------
CLEAN_CSV = "source,target\nFrance,Paris\nGermany,Berlin\n"


def _word_tokenizer(text, add_special_tokens=False):
    """One token per whitespace-separated word (enough for the single-token filter)."""
    return {"input_ids": [hash(w) for w in text.split()]}


def test_csv_header_and_cells_with_spaces_load_like_a_clean_one(tmp_path):
    clean, spaced = tmp_path / "clean.csv", tmp_path / "spaced.csv"
    clean.write_text(CLEAN_CSV)
    spaced.write_text("source, target\n France , Paris\nGermany,  Berlin \n\n")
    assert R.load(spaced).pairs == R.load(clean).pairs == (("France", "Paris"), ("Germany", "Berlin"))


def test_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + CLEAN_CSV.encode())
    assert R.load(path).pairs == (("France", "Paris"), ("Germany", "Berlin"))
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([["France", "Paris"]]).encode())
    assert R.load(path).pairs == (("France", "Paris"),)


def _latin1(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"latin1{suffix}"
    pair = ["Réunion", "Saint-Denis"]
    text = CLEAN_CSV + ",".join(pair) + "\n" if suffix == ".csv" else json.dumps([pair], ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_latin1_file_gives_one_sentence_naming_the_fix(tmp_path, suffix):
    path = _latin1(tmp_path, suffix)
    with pytest.raises(R.RelationError) as err:
        R.load(path)
    msg = str(err.value)
    assert str(path) in msg and "UTF-8" in msg and "iconv -f latin1 -t utf-8" in msg and "\n" not in msg
    offset = path.read_bytes().index(b"\xe9")
    assert f"byte 0xe9 at offset {offset}" in msg
    assert isinstance(err.value, MapsError)


def test_cli_reports_a_latin1_file_in_one_line(tmp_path):
    path = _latin1(tmp_path, ".csv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MAPS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "maps_utils.cli", "relations", str(path), "--models", "smollm2-135m"]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("error: ") and "UTF-8" in err and "\n" not in err and "Traceback" not in err


def test_repeated_pairs_are_dropped_before_the_minimum(tmp_path, caplog):
    path = tmp_path / "repeated.json"
    path.write_text(json.dumps([["Spain", "Madrid"], ["France", "Paris"]] * 45))
    with caplog.at_level(logging.WARNING, logger="maps_utils.relations"):
        rel = R.load(path)
    assert rel.pairs == (("Spain", "Madrid"), ("France", "Paris")) and rel.duplicate_sources == ()
    assert "relation repeated: dropped 88 duplicate pairs" in caplog.text
    kept = R.filter_single_token(rel, _word_tokenizer)
    assert len(kept) == 2 and not kept.usable  # 90 lines, but 2 pairs: below the 30-pair minimum
    built = R.Relation("built", [("a", "b"), ("c", "d")] * 45)  # built from a list of pairs: the same rule
    assert built.pairs == (("a", "b"), ("c", "d")) and "relation built: dropped 88" in caplog.text


def test_copying_flag_of_user_files_follows_the_name(tmp_path):
    folder = tmp_path / "my"
    folder.mkdir()
    for name in ("name_copying.json", "Word_COPYING.csv", "capitals.json"):
        (folder / name).write_text(CLEAN_CSV if name.endswith(".csv") else json.dumps([["a", "a"]]))
    assert R.load(folder / "name_copying.json").copying and R.load(folder / "name_copying.json").k() == 1
    assert R.load(folder / "Word_COPYING.csv").copying
    assert not R.load(folder / "capitals.json").copying
    assert not R.load(folder / "name_copying.json", copying=False).copying
    assert R.load(folder / "capitals.json", copying=True).k() == 1


def test_shipped_relations_keep_their_copying_flag():
    assert R.load("name_copying").copying and R.load("copying").copying
    assert not R.load("country_capital").copying
    assert R.load("country_capital", copying=True).copying  # an explicit flag wins


# ---- tokenisation filters on a real tokenizer -----------------------------------------------------------
@pytest.mark.embedded
def test_user_csv_relation_loads_and_filters(tmp_path, smollm2):
    path = tmp_path / "mine.csv"
    path.write_text("source,target\nFrance,Paris\nGermany,Berlin\nBurkina Faso,Ouagadougou\nUnited Kingdom,London\n")
    rel = R.load(path)
    assert rel.name == "mine" and len(rel) == 4 and rel.category is None
    tok = smollm2.tokenizer
    kept = R.filter_single_token(rel, tok, min_pairs=2)
    assert kept.pairs == [("France", "Paris"), ("Germany", "Berlin")]
    assert kept.dropped == [("Burkina Faso", "Ouagadougou"), ("United Kingdom", "London")]
    assert kept.usable
    assert tok.decode([kept.source_ids[0]]) == " France" and tok.decode([kept.target_ids[1]]) == " Berlin"
    assert not R.filter_single_token(rel, tok).usable  # default minimum is the paper's 30
    multi = R.filter_multi_token(rel, tok, min_pairs=1)
    n_tokens = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    expected = [(s, t) for s, t in rel.pairs if n_tokens(s) > 1 and n_tokens(" " + t) == 1]
    assert multi.pairs == expected and ("United Kingdom", "London") in expected
    assert all(len(ids) > 1 for ids in multi.source_ids)


# Single-token survivors per relation (README table); a change to a dataset or tokenizer must update these.
USABLE = {  # relation: (smollm2-135m, gemma3-270m)
    "copying": (459, 479), "name_copying": (249, 372), "word_first_letter": (278, 292),
    "word_last_letter": (278, 292), "year_following": (0, 0), "country_capital": (40, 87),
    "country_language": (77, 98), "object_superclass": (254, 335), "product_company": (42, 182),
    "work_location": (47, 74), "adj_comparative": (69, 85), "adj_superlative": (40, 63),
    "noun_pronoun": (221, 265), "verb_past_tense": (146, 151), "word_antonym": (220, 230),
    "word_compound": (207, 262), "word_homophone": (198, 268), "word_synonym": (318, 355),
    "english_french": (133, 446), "english_spanish": (64, 499),
}


@pytest.mark.embedded
def test_usable_pairs_for_the_embedded_tokenizers(smollm2, gemma3):
    table = R.usable_pairs_table({"smollm2": smollm2.tokenizer, "gemma3": gemma3.tokenizer}).set_index("relation")
    got = {name: (int(row.smollm2), int(row.gemma3)) for name, row in table.iterrows()}
    assert got == USABLE
    usable = table.index[table["smollm2 >= 30"]].tolist()
    assert len(usable) >= 12
    # both tokenizers split numbers into single digits, so no year is one token (as for Llama-3 in the paper)
    assert usable == [n for n in USABLE if n != "year_following"]


# ---- reliability round 3 (issue 35) ---------------------------------------------------------------------
@pytest.mark.parametrize(("name", "text"), [
    ("tabs.csv", "source\ttarget\nUnited States\tWashington, D.C.\nFrance\tParis\n"),
    ("tabs.tsv", "source\ttarget\nUnited States\tWashington, D.C.\nFrance\tParis\n"),
    ("semicolons.csv", "source;target\nUnited States;Washington, D.C.\nFrance;Paris\n"),
])
def test_tab_and_semicolon_separated_files_load(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert R.load(path).pairs == (("United States", "Washington, D.C."), ("France", "Paris"))
    assert R.load(str(path)).name == path.stem


def test_a_header_without_the_columns_names_the_delimiter_and_the_columns(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("from\tto\na\tb\n")
    with pytest.raises(R.RelationError) as err:
        R.load(path)
    msg = str(err.value)
    assert "'source' and 'target' columns" in msg and "split at tabs" in msg and "'from', 'to'" in msg
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(R.RelationError, match="split at commas, has no columns"):
        R.load(tmp_path / "empty.csv")


def test_a_folder_is_not_a_relation_file(tmp_path, capsys):
    from maps_utils import cli

    (tmp_path / "dir.json").mkdir()
    for folder in (tmp_path, tmp_path / "dir.json", str(tmp_path)):
        with pytest.raises(R.RelationError) as err:
            R.load(folder)
        assert str(err.value) == f"{folder} is a folder, not a relation file; pass a .json, .csv or .tsv file of pairs."
    assert R.load("copying").name == "copying"  # a shipped name still wins
    assert cli.main(["relations", str(tmp_path), "--models", "smollm2-135m"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} is a folder, not a relation file; pass a .json, .csv or " \
                                      ".tsv file of pairs.\n"


@pytest.mark.embedded
def test_cli_relations_takes_relation_files_listed_after_models(tmp_path, model_cache, monkeypatch, capsys):
    from maps_utils import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "mine.csv"
    path.write_text("source,target\nFrance,Paris\nGermany,Berlin\nBurkina Faso,Ouagadougou\n")
    assert cli.main(["relations", "--models", "smollm2-135m", str(path), "--min-pairs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["relation", "category", "pairs", "smollm2-135m", "smollm2-135m", ">=", "1"]
    assert out[1].split() == ["mine", "None", "3", "2", "True"] and len(out) == 2
