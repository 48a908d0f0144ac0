"""Checkable predicate families for executable head descriptions (notebook 04).

A head's salient operations are rows: a source token with its top mapped tokens. An executable description is a
pair (input condition, operation), each a :class:`Clause` drawn from a family below and fitted on the rows the
describer is shown; a row *follows* the description when the condition holds on its source and the operation on
one of its mappings. Every clause is a plain Python test, so a description is checked by running it (exactly,
with no LLM) on rows it never saw.

Families (``side`` "input" tests the source, "output" tests (source, mapping)):

* **fixed string rules** (output): copy, surface forms (case and leading-space variants, inflections such as
  plural and comparative), first letter, same first letter, shared prefix or suffix, numeric successor, and
  membership in each of the study's relation datasets;
* **associates** (output): the mapping is among the source's ``k`` nearest neighbours in the model's own input
  embedding space (cosine), or its case-folded self. Parameters only; no extra model;
* **output set** (output, fitted): the mapping is one of at most :data:`MAX_SET` tokens, the head's most frequent
  outputs on the shown rows;
* **token classes** (input or output): pronouns, possessives, number words, wh-words, punctuation, quotation marks,
  brackets, whitespace, code, non-Latin script, …, and the source or target sides of the relation datasets
  (countries, capitals, languages, …);
* **input centroid** (input, fitted): the source's embedding lies within a fitted cosine of the shown sources'
  mean direction.

Each clause counts its fitted parameters (``n_params``): a class or a rule has none to one, an output set one per
token. :mod:`maps_utils.describe.executable` fits, selects and verifies descriptions from these clauses.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .rules import _BUILTINS, SKIPPED_RELATIONS, _inflection, normalise

MAX_SET = 5  # an output set names at most this many tokens: the cap on a fitted family's parameters
N_ASSOCIATES = 50  # nearest neighbours in the input embedding that count as a source's associates


@dataclass(frozen=True)
class Row:
    """One salient operation: a source token and its top mapped tokens (decoded strings and ids)."""

    source: str
    targets: tuple[str, ...]
    source_id: int = -1
    target_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Clause:
    """A checkable statement about a row's source (``side`` "input") or its mappings (``side`` "output").

    ``family`` names the predicate family (for the per-family controls), ``label`` the fitted clause, ``phrase``
    the words a sentence uses for it, ``n_params`` how many parameters were fitted to the shown rows."""

    family: str
    side: str
    label: str
    phrase: str
    test: Callable[[str], bool] | Callable[[str, str], bool] = field(repr=False, compare=False)
    n_params: int = 0
    id_test: Callable[[int, int], bool] | None = field(default=None, repr=False, compare=False)

    def holds(self, row: Row) -> bool:
        """The input side tests the source; the output side holds when any mapping satisfies it."""
        if self.side == "input":
            return bool(self.test(row.source))
        if self.id_test is not None:
            return any(self.id_test(row.source_id, t) for t in row.target_ids)
        return any(self.test(row.source, t) for t in row.targets)


# ---- token classes --------------------------------------------------------------------------------------
_WORDS = {
    "pronouns": "i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it "
                "its itself we us our ours ourselves they them their theirs themselves",
    "possessive pronouns": "my mine your yours his her hers its our ours their theirs whose",
    "reflexive pronouns": "myself yourself yourselves himself herself itself ourselves themselves oneself",
    "number words": "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
                    "hundred thousand million billion first second third fourth fifth sixth seventh eighth ninth "
                    "tenth once twice half dozen",
    "wh-words": "what who whom whose which where when why how whatever whoever wherever whenever however whether",
    "articles and determiners": "the a an this that these those some any every each no another either neither "
                                "such all both",
    "quantifiers": "all every each any more less most some many few several both either neither none whichever "
                   "whatever another other others much enough",
    "conjunctions": "and or but nor so yet because although though while if unless since whereas whether than as",
    "prepositions": "of in on at to for with by from about into onto over under between through during after "
                    "before against without within among upon across toward towards behind beyond around near",
    "auxiliary verbs": "is are was were be been being am has have had do does did will would can could shall should "
                       "may might must",
    "months and weekdays": "january february march april may june july august september october november december "
                           "monday tuesday wednesday thursday friday saturday sunday",
    "code keywords": "def return import self class const var let function null none true false elif else print int "
                     "str void public private static async await lambda yield struct from pass raise try except "
                     "finally while for if",
}
_QUOTES = set("\"'`“”‘’«»„‚‹›")
_OPEN = set("([{<“‘«‹")
_CLOSE = set(")]}>”’»›")
_CODE_CHARS = set("_{}()[];=<>#$\\/@|*&^~")


def _bare(token: str) -> str:
    return re.sub(r"^[\s\u2581\u0120]+|[\s\u2581\u0120]+$", "", token)


def _is_punct(token: str) -> bool:
    b = _bare(token)
    return bool(b) and all(unicodedata.category(c)[0] in "PS" for c in b)


def _non_latin(token: str) -> bool:
    return any(c.isalpha() and ord(c) > 0x24F for c in _bare(token))


def _code(token: str) -> bool:
    b = _bare(token)
    if normalise(b) in _WORD_SETS["code keywords"]:
        return True
    has_code = any(c in _CODE_CHARS for c in b)
    return (has_code and any(c.isalnum() for c in b)) or bool(re.fullmatch(r"[a-z]+[A-Z][A-Za-z]*", b))


_WORD_SETS = {name: frozenset(words.split()) for name, words in _WORDS.items()}


def _in(words: frozenset[str]) -> Callable[[str], bool]:
    return lambda token: normalise(token) in words


def _all_in(chars: set) -> Callable[[str], bool]:
    return lambda token: bool(_bare(token)) and all(c in chars for c in _bare(token))


_FUNCTION = frozenset().union(*(_WORD_SETS[n] for n in ("pronouns", "possessive pronouns", "reflexive pronouns",
                                                         "wh-words", "articles and determiners", "quantifiers",
                                                         "conjunctions", "prepositions", "auxiliary verbs")))

TOKEN_CLASSES: dict[str, Callable[[str], bool]] = {
    **{name: _in(words) for name, words in _WORD_SETS.items() if name != "code keywords"},
    "function words": _in(_FUNCTION),
    "adverbs ending in -ly": lambda t: len(normalise(t)) > 4 and normalise(t).isalpha() and normalise(t).endswith("ly"),
    "punctuation": _is_punct,
    "quotation marks": _all_in(_QUOTES),
    "opening brackets or quotes": _all_in(_OPEN),
    "closing brackets or quotes": _all_in(_CLOSE),
    "whitespace or newlines": lambda t: bool(t) and not t.strip(),
    "tokens with a newline": lambda t: "\n" in t,
    "digits": lambda t: bool(re.fullmatch(r"[0-9]+(?:[.,][0-9]+)*", _bare(t))),
    "code": _code,
    "non-Latin script": _non_latin,
    "single letters": lambda t: len(_bare(t)) == 1 and _bare(t).isalpha(),
    "capitalised words": lambda t: len(_bare(t)) > 1 and _bare(t).isalpha() and _bare(t)[0].isupper()
    and _bare(t)[1:].islower(),
    "word pieces without a leading space": lambda t: len(t) > 1 and t.isalpha() and t == _bare(t),
    "all-caps words": lambda t: len(_bare(t)) > 1 and _bare(t).isalpha() and _bare(t).isupper(),
    "tokens starting with a capital": lambda t: _bare(t)[:1].isupper(),
    "tokens without a leading space": lambda t: bool(t.strip()) and t[0] not in " \u2581\u0120\n\t",
    "long words (9+ letters)": lambda t: len(_bare(t)) >= 9 and _bare(t).isalpha(),
}
"""Token classes by name: a test on the decoded token string. Input conditions and output classes use them."""


RELATION_CLASSES = {
    "first names": ("name_copying", 0), "years": ("year_following", 0), "country names": ("country_capital", 0),
    "capital cities": ("country_capital", 1), "language names": ("country_language", 1),
    "product names": ("product_company", 0), "company names": ("product_company", 1),
    "occupations": ("work_location", 0), "workplaces": ("work_location", 1),
    "category nouns (animal, tool, …)": ("object_superclass", 1), "comparative adjectives": ("adj_comparative", 1),
    "superlative adjectives": ("adj_superlative", 1), "past-tense verbs": ("verb_past_tense", 1),
    "French words": ("english_french", 1), "Spanish words": ("english_spanish", 1),
}
"""Token classes read from one side of a relation dataset: only sides that form a category (the sources of
english_french, say, are general English words, and are no class)."""


def relation_classes(relations: Iterable) -> dict[str, Callable[[str], bool]]:
    """The :data:`RELATION_CLASSES` of the given relations, as tests on normalised strings."""
    by_name = {rel.name: rel for rel in relations}
    out: dict[str, Callable[[str], bool]] = {}
    for name, (rel, side) in RELATION_CLASSES.items():
        if rel in by_name:
            out[name] = _in(frozenset(normalise(p[side]) for p in by_name[rel].pairs) - {""})
    return out


# ---- fixed clauses ------------------------------------------------------------------------------------
def _surface(s: str, t: str) -> bool:
    """Case or leading-space variant, or another inflection (plural, comparative, tense) of the same word."""
    a, b = normalise(s), normalise(t)
    if not a or not b:
        return False
    if a == b:
        return s != t
    if not (a.isalpha() and b.isalpha()):
        return False
    short, long_ = sorted((a, b), key=len)
    if len(short) >= 3 and long_.startswith(short) and long_[len(short):] in _ENDINGS:
        return True
    return _inflection(a, b)


_ENDINGS = {"s", "es", "er", "est", "ed", "d", "ing", "ly", "r", "st"}


def _rule(rule: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    def test(source: str, target: str) -> bool:
        a, b = normalise(source), normalise(target)
        return bool(a) and bool(b) and rule(a, b)

    return test


def fixed_clauses(relations: Iterable = (), classes: dict | None = None) -> list[Clause]:
    """The clauses that fit nothing: string rules, relation memberships, and every token class on both sides."""
    relations = list(relations)
    out = [Clause("copy", "output", "copy", "copies the input (ignoring case and leading space)",
                  _rule(lambda a, b: a == b))]
    out.append(Clause("surface forms", "output", "surface forms",
                      "writes the input's own surface forms (case or space variants, plural, comparative, tense)",
                      _surface))
    out += [Clause(name, "output", name, sentence, _rule(rule)) for name, sentence, rule in _BUILTINS if name != "copy"]
    for rel in relations:
        if rel.name in SKIPPED_RELATIONS:
            continue
        pairs = frozenset((normalise(s), normalise(t)) for s, t in rel.pairs)
        display = (getattr(rel, "display_name", None) or rel.name.replace("_", " ")).replace(" to ", " → ", 1)
        out.append(Clause("relation", "output", f"relation:{rel.name}", f"maps by the relation '{display}'",
                          _rule(lambda a, b, pairs=pairs: (a, b) in pairs)))
    classes = {**TOKEN_CLASSES, **relation_classes(relations)} if classes is None else classes
    for name, test in classes.items():
        out.append(Clause("input class", "input", f"input:{name}", name, test, 1))
        out.append(Clause("output class", "output", f"output:{name}", f"writes {name}",
                          lambda s, t, test=test: test(t), 1))
    return out


# ---- fitted clauses -----------------------------------------------------------------------------------
def output_sets(rows: Sequence[Row], max_size: int = MAX_SET, min_rows: int = 2) -> list[Clause]:
    """Output-set clauses fitted on ``rows``: the 1..``max_size`` most frequent mapped tokens (each counted once
    per row, and in at least ``min_rows`` rows)."""
    counts = Counter(t for r in rows for t in dict.fromkeys(r.targets))
    top = [t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c >= min_rows][:max_size]
    out = []
    for m in range(1, len(top) + 1):
        chosen = frozenset(top[:m])
        shown = ", ".join(repr(t) for t in top[:m])
        out.append(Clause("output set", "output", f"set:{shown}", f"writes one of {shown}",
                          lambda s, t, chosen=chosen: t in chosen, m))
    return out


@dataclass
class Embedding:
    """The model's input embedding as unit rows (for associates and centroids) and a cache of neighbour sets."""

    unit: np.ndarray  # [V, d] float32, rows of E divided by their norms
    tokens: Sequence[str] | None = None  # the decoded vocabulary (for case-folded selves)
    k: int = N_ASSOCIATES
    _neighbours: dict[int, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, E, tokens: Sequence[str] | None = None, k: int = N_ASSOCIATES) -> Embedding:
        """From the model's ``E`` [V, d] (a torch tensor or an array) and its decoded vocabulary."""
        x = np.asarray(E.detach().float().cpu().numpy() if hasattr(E, "detach") else E, dtype=np.float32)
        return cls(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), tokens, k)

    def prepare(self, ids: Iterable[int], chunk: int = 256) -> None:
        """Compute the ``k`` nearest neighbours (cosine) of every id in ``ids`` not yet known, in chunks."""
        todo = sorted({int(i) for i in ids if int(i) >= 0} - set(self._neighbours))
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            sims = self.unit[part] @ self.unit.T  # [n, V]
            top = np.argpartition(-sims, self.k, axis=1)[:, : self.k + 1]
            for i, row in zip(part, top, strict=True):
                self._neighbours[i] = frozenset(int(j) for j in row)

    def neighbours(self, i: int) -> frozenset[int]:
        if i not in self._neighbours:
            self.prepare([i])
        return self._neighbours[i]

    def associates_clause(self, tokens: Sequence[str] | None = None) -> Clause:
        """The associates family: a mapping among the source's ``k`` nearest neighbours, or its case-folded self."""
        def by_id(s: int, t: int) -> bool:
            return s >= 0 and t >= 0 and (t in self.neighbours(s) or (tokens is not None
                                          and normalise(tokens[s]) == normalise(tokens[t]) != ""))

        return Clause("associates", "output", f"associates (k={self.k})",
                      f"writes close associates of the input (its {self.k} nearest neighbours in the model's "
                      "embedding, or itself in another case)", lambda s, t: False, 0, by_id)

    def centroid_clauses(self, rows: Sequence[Row], quantiles: Sequence[float] = (0.0, 0.2)) -> list[Clause]:
        """Input-centroid clauses: the source lies within the cosine reached by the given quantiles of the shown
        sources around their mean direction (one fitted threshold each)."""
        ids = [r.source_id for r in rows if r.source_id >= 0]
        if len(ids) < 3:
            return []
        c = self.unit[ids].mean(axis=0)
        c = c / max(float(np.linalg.norm(c)), 1e-12)
        cos = self.unit[ids] @ c
        out = []
        for q in quantiles:
            tau = float(np.quantile(cos, q))
            examples = ", ".join(repr(r.source) for r in rows[:3])
            out.append(Clause("input centroid", "input", f"centroid(cos>={tau:.2f})",
                              f"inputs like {examples} (cosine >= {tau:.2f} to the shown inputs' mean embedding)",
                              _centroid_test(self.unit, c, tau), 1, None))
        return out


def _centroid_test(unit: np.ndarray, centre: np.ndarray, tau: float):
    def test(source_id: int) -> bool:
        return source_id >= 0 and float(unit[source_id] @ centre) >= tau

    return test


def truth(clause: Clause, rows: Sequence[Row]) -> np.ndarray:
    """Whether ``clause`` holds on each row (a boolean vector). Centroid clauses test the source id."""
    if clause.family == "input centroid":
        return np.fromiter((clause.test(r.source_id) for r in rows), bool, len(rows))
    return np.fromiter((clause.holds(r) for r in rows), bool, len(rows))
