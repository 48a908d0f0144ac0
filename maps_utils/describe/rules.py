"""Rule describer: executable, deterministic descriptions of an attention head.

A head's salient operations are rows of a source token string and its top mapped token strings
(decoded tokens, usually with a leading space, e.g. ``" Paris" -> [" France", " Paris", ...]``).
The rule describer tests a library of named :class:`Predicate` objects over (source, mapped token)
and describes the head by the predicates that hold for most of its rows. Each description is both
a sentence and the predicates that produced it, so :meth:`RuleDescription.follows` checks it
exactly on new rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from os.path import commonprefix
from typing import TYPE_CHECKING

from ..relations import Relation, load_all

if TYPE_CHECKING:
    import pandas as pd


UNCLEAR = "Unclear"
# relations that duplicate a built-in predicate: copying, name_copying -> copy; word_first_letter -> first_letter
SKIPPED_RELATIONS = frozenset({"copying", "name_copying", "word_first_letter"})
_EDGES = re.compile(r"^[\s\u2581\u0120]+|[\s\u2581\u0120]+$")  # whitespace, SentencePiece "▁", GPT-2 "Ġ"
_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"[0-9]+(?:[.,][0-9]+)*")


@dataclass(frozen=True)
class Predicate:
    """A named test over (source, target) decoded token strings, with a plain-English sentence."""

    name: str
    sentence: str
    test: Callable[[str, str], bool]


def normalise(token: str) -> str:
    """Strip surrounding whitespace and "▁" / "Ġ" space markers, and lower-case.

    Args:
        token: A decoded token string, e.g. ``" Paris"`` or ``"▁Paris"``.

    Returns:
        The bare lower-case form, e.g. ``"paris"``.
    """
    return _EDGES.sub("", token).lower()


# ---- built-in predicates (all on normalised strings; empty strings never satisfy anything) ------------
def _pair(source: str, target: str) -> tuple[str, str] | None:
    s, t = normalise(source), normalise(target)
    return (s, t) if s and t else None


def _copy(s: str, t: str) -> bool:
    return s == t


def _first_letter(s: str, t: str) -> bool:
    return len(t) == 1 and t.isalpha() and len(s) > 1 and s[0] == t


def _same_first_letter(s: str, t: str) -> bool:
    return s != t and len(t) > 1 and s[0] == t[0] and s[0].isalpha()


def _shared_prefix(s: str, t: str) -> bool:
    return s != t and len(commonprefix([s, t])) >= 3


def _shared_suffix(s: str, t: str) -> bool:
    return s != t and len(commonprefix([s[::-1], t[::-1]])) >= 3


@lru_cache(maxsize=65536)
def _lemmas(word: str) -> frozenset[str]:
    """All lemmas lemminflect knows for ``word``; its out-of-vocabulary NOUN/VERB rules as a fallback."""
    import lemminflect

    found = {lemma for lemmas in lemminflect.getAllLemmas(word).values() for lemma in lemmas}
    if not found:
        for upos in ("NOUN", "VERB"):
            found.update(lemma for lemmas in lemminflect.getAllLemmasOOV(word, upos).values() for lemma in lemmas)
    return frozenset(found)


def _inflection(s: str, t: str) -> bool:
    return s != t and s.isalpha() and t.isalpha() and bool(_lemmas(s) & _lemmas(t))


def _numeric_successor(s: str, t: str) -> bool:
    return bool(_INTEGER.fullmatch(s) and _INTEGER.fullmatch(t)) and int(t) == int(s) + 1


def _on_normalised(rule: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    """Wrap a rule on normalised strings as a test on raw decoded tokens (False when either side is empty)."""

    def test(source: str, target: str) -> bool:
        pair = _pair(source, target)
        return pair is not None and rule(*pair)

    return test


_BUILTINS = (
    ("copy", "copies the input token (ignoring case and leading spaces)", _copy),
    ("first_letter", "maps a word to its first letter", _first_letter),
    ("same_first_letter", "maps to words starting with the same letter", _same_first_letter),
    ("shared_prefix", "maps to words sharing the input's beginning (3+ letters)", _shared_prefix),
    ("shared_suffix", "maps to words sharing the input's ending (3+ letters)", _shared_suffix),
    ("inflection", "maps to another inflection of the same word", _inflection),
    ("numeric_successor", "maps a number to the next number", _numeric_successor),
)


def relation_predicate(relation: Relation) -> Predicate:
    """A predicate that holds when (source, target) is one of ``relation``'s pairs, after normalising both.

    Args:
        relation: A relation with ``name``, ``pairs`` and optionally ``display_name``.

    Returns:
        The predicate ``relation:<name>``.
    """
    pairs = frozenset((normalise(s), normalise(t)) for s, t in relation.pairs)
    display = getattr(relation, "display_name", None) or relation.name.replace("_", " ")
    phrase = display.replace(" to ", " → ", 1)
    sentence = f"maps the input by the relation '{phrase}' (per the study's {relation.name} dataset)"
    return Predicate(f"relation:{relation.name}", sentence, _on_normalised(lambda s, t: (s, t) in pairs))


def predicate_library(relations: Iterable[Relation] | None = None) -> list[Predicate]:
    """The built-in predicates, then one per relation (skipping those that duplicate a built-in).

    Args:
        relations: Relation datasets to turn into membership predicates; none when ``None``.

    Returns:
        The predicates in library order.
    """
    library = [Predicate(name, sentence, _on_normalised(rule)) for name, sentence, rule in _BUILTINS]
    for relation in relations or ():
        if relation.name not in SKIPPED_RELATIONS:
            library.append(relation_predicate(relation))
    return library


def row_holds(pred: Predicate, source: str, mappings: Sequence[str]) -> bool:
    """Whether ``pred`` holds on a row: any of the row's mappings satisfies it.

    Args:
        pred: The predicate to test.
        source: The row's source token string.
        mappings: The row's mapped token strings (a list, not a single string).

    Returns:
        True when some mapping satisfies ``pred.test(source, mapping)``.
    """
    if isinstance(mappings, str):
        raise TypeError(f"mappings must be a list of token strings, not the single string {mappings!r}.")
    return any(pred.test(source, target) for target in mappings)


# ---- describing rows ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleDescription:
    """A head's rule description: the chosen predicates, every predicate's share, and two sentences."""

    predicates: tuple[str, ...]
    shares: dict[str, float] = field(hash=False)
    pattern: str
    inputs: str
    _rules: tuple[Predicate, ...] = field(default=(), repr=False, compare=False)

    def follows(self, source: str, mappings: Sequence[str]) -> bool:
        """The executable description: whether any chosen predicate holds on the row (False when none)."""
        return any(row_holds(pred, source, mappings) for pred in self._rules)


def _input_features() -> list[tuple[str, Callable[[str], bool]]]:
    """Surface features of a raw source token, each with the phrase that reports it."""

    def bare(token: str) -> str:
        return _EDGES.sub("", token)

    return [
        ("numbers", lambda s: bool(_NUMBER.fullmatch(bare(s)))),
        ("capitalised words", lambda s: len(bare(s)) > 1 and bare(s).isalpha() and bare(s)[0].isupper()),
        ("lower-case words", lambda s: len(bare(s)) > 1 and bare(s).isalpha() and bare(s).islower()),
        ("word pieces without a leading space", lambda s: bare(s).isalpha() and bare(s) == s.rstrip()),
        ("single letters/punctuation",
         lambda s: len(bare(s)) == 1 or (bare(s) != "" and not any(c.isalnum() for c in bare(s)))),
    ]


def describe_inputs(sources: Sequence[str], min_share: float = 0.5) -> str:
    """One sentence on the sources' surface form: each feature holding for >= ``min_share`` of them.

    Args:
        sources: The source token strings.
        min_share: The share of sources a feature must reach to be reported.

    Returns:
        E.g. ``"Mostly numbers (12/15 inputs)."``, or ``"Unclear"`` when no feature qualifies.
    """
    n = len(sources)
    found = []
    for phrase, feature in _input_features():
        count = sum(feature(s) for s in sources)
        if n and count / n >= min_share:
            found.append(f"mostly {phrase} ({count}/{n} inputs)")
    if not found:
        return UNCLEAR
    text = "; ".join(found)
    return text[0].upper() + text[1:] + "."


def describe_rows(rows: Sequence[tuple[str, Sequence[str]]], library: Sequence[Predicate], *,
                  min_share: float = 0.5) -> RuleDescription:
    """Describe a head by the library predicates that hold for at least ``min_share`` of its rows.

    Args:
        rows: ``(source, mappings)`` pairs, one per salient token.
        library: The predicates to test, in library order.
        min_share: The inclusive share of rows a predicate needs to be chosen, in (0, 1].

    Returns:
        The description; chosen predicates are ordered by share (descending), then library order.

    Raises:
        ValueError: When ``rows`` is empty or ``min_share`` is outside (0, 1].
    """
    if not rows:
        raise ValueError("describe_rows needs at least one (source, mappings) row to describe a head.")
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}.")
    n = len(rows)
    shares = {pred.name: sum(row_holds(pred, s, ms) for s, ms in rows) / n for pred in library}
    order = sorted(range(len(library)), key=lambda i: (-shares[library[i].name], i))
    chosen = tuple(library[i] for i in order if shares[library[i].name] >= min_share)
    if chosen:
        parts = [f"{p.sentence}, in {shares[p.name]:.0%} of rows" for p in chosen]
        pattern = "The head " + "; ".join(parts) + "."
    else:
        pattern = UNCLEAR
    inputs = describe_inputs([s for s, _ in rows])
    return RuleDescription(tuple(p.name for p in chosen), shares, pattern, inputs, chosen)


def _as_list(mappings: object) -> list[str]:
    """Mappings as a list of strings (a JSON list string, as cached tables store them, is decoded)."""
    return json.loads(mappings) if isinstance(mappings, str) else list(mappings)


def describe_ops(ops: pd.DataFrame, library: Sequence[Predicate] | None = None, *, min_share: float = 0.5,
                 max_rank: int | None = None) -> pd.DataFrame:
    """Rule descriptions of every head in a salient-operations table.

    Args:
        ops: One row per (layer, head, salient token) with columns layer, head, rank (0-based),
            token (str) and mappings (list of str, or its JSON string).
        library: The predicates; by default :func:`predicate_library` of all shipped relations.
        min_share: The inclusive share of rows a predicate needs to be chosen.
        max_rank: When given, only rows with ``rank < max_rank`` are used.

    Returns:
        One row per head sorted by (layer, head): layer, head, pattern, inputs, predicates (a JSON
        list string), top_predicate (name or ""), top_share (its share, 0.0 when none), has_pattern,
        n_rows.

    Raises:
        ValueError: When columns are missing or no rows remain.
    """
    import pandas as pd

    missing = [c for c in ("layer", "head", "rank", "token", "mappings") if c not in ops.columns]
    if missing:
        raise ValueError(f"describe_ops needs columns {', '.join(missing)} in the salient-operations table.")
    if library is None:

        library = predicate_library(load_all())
    used = ops if max_rank is None else ops[ops["rank"] < max_rank]
    if used.empty:
        raise ValueError(f"No salient operations to describe (max_rank={max_rank}, {len(ops)} rows in total).")
    records = []
    for (layer, head), group in used.sort_values(["layer", "head", "rank"]).groupby(["layer", "head"], sort=True):
        rows = [(str(t), _as_list(ms)) for t, ms in zip(group["token"], group["mappings"], strict=True)]
        desc = describe_rows(rows, library, min_share=min_share)
        top = desc.predicates[0] if desc.predicates else ""
        records.append({
            "layer": int(layer), "head": int(head), "pattern": desc.pattern, "inputs": desc.inputs,
            "predicates": json.dumps(list(desc.predicates)), "top_predicate": top,
            "top_share": float(desc.shares[top]) if top else 0.0, "has_pattern": bool(top), "n_rows": len(rows),
        })
    return pd.DataFrame.from_records(records).reset_index(drop=True)
