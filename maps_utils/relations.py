"""Relation datasets: load, validate, tokenisation filters, categories and templates.

A relation is a list of ``[source, target]`` string pairs (the common MAPS JSON format), or a CSV
(or ``.tsv``) file with ``source`` and ``target`` columns, separated by commas, tabs or semicolons
(the header line tells which). The shipped relations live in ``data/relations/`` with one
metadata file, ``relations.json``, giving each relation's category, display name, whether it is
a copying relation (k = 1 instead of 10 in the paper), its causal-experiment template, its
provenance, and its pair count and SHA-256.

Relation files must be UTF-8 text (a leading byte-order mark is fine); a file in another encoding
is rejected with the byte where decoding failed and the ``iconv`` command that fixes it. CSV
header names and cells are stripped of surrounding whitespace, so ``source, target`` works.
Pairs that occur more than once are dropped (the first occurrence is kept, order is kept, and a
warning names the relation and the count) when a :class:`Relation` is built, so repeated pairs
never count towards the 30-pair minimum. The same source with different targets is legitimate and
only reported (``duplicate_sources``).

Copying relations (k = 1): a shipped relation takes the flag from ``relations.json``. A relation
file of your own is a copying relation when its name (the file name without extension) contains
"copying", in any case, as in the paper's reference code (so ``my/name_copying.json`` is scored at
k = 1). ``load(path, copying=True/False)`` (the CLI's ``--copying``) overrides both rules.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shlex
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .core.errors import MapsError
from .core.hashing import file_sha256 as file_sha256  # relations.json's checksums: this SHA-256

log = logging.getLogger(__name__)

RELATIONS_ENV = "MAPS_RELATIONS_DIR"
CATEGORIES = ("algorithmic", "knowledge", "linguistic", "translation")
PLACEHOLDER = "<X>"
MIN_PAIRS = 30  # the paper uses a relation for a model only with >= 30 single-token pairs


class RelationError(MapsError):
    """A relation file or name is not usable; the message names the problem and the fix."""


def default_data_dir() -> Path:
    """``$MAPS_RELATIONS_DIR`` if set, else ``data/relations`` of this repository."""
    env = os.environ.get(RELATIONS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "relations"


@dataclass(frozen=True)
class Relation:
    """A validated relation: its pairs and (for shipped relations) its metadata."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    category: str | None = None
    display_name: str | None = None
    copying: bool = False
    multi_token: bool = False  # part of the paper's multi-token experiment (MAPS-SPEC §1.6)
    causal_template: str | None = None
    provenance: str | None = None
    path: Path | None = None
    duplicate_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", tuple(dedupe_pairs(self.pairs, self.name)))

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def sources(self) -> list[str]:
        return [s for s, _ in self.pairs]

    @property
    def targets(self) -> list[str]:
        return [t for _, t in self.pairs]

    def k(self, top_k: TopK | None = None) -> int:
        """This relation's top-k under ``top_k`` (default the paper's: 1 for copying relations, 10 otherwise)."""
        return (top_k or TopK()).of(self)


@dataclass(frozen=True)
class TopK:
    """The k of the top-k test, by kind of relation: the paper's 1 for copying relations and 10 for the others
    (:data:`LLAMA3_TOP_K`: 3 and 25, the paper's choice for Llama-3.x)."""

    copying: int = 1
    other: int = 10

    def of(self, relation) -> int:
        """The k of ``relation`` (anything with a ``copying`` flag)."""
        return self.copying if relation.copying else self.other


LLAMA3_TOP_K = TopK(copying=3, other=25)


@dataclass
class TokenizedRelation:
    """The pairs of a relation that survive a tokenisation filter, with their token ids."""

    relation: Relation
    pairs: list[tuple[str, str]]
    source_ids: list[int] | list[list[int]]
    target_ids: list[int]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    min_pairs: int = MIN_PAIRS

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def usable(self) -> bool:
        """Whether enough pairs survive (the paper's minimum is 30)."""
        return len(self.pairs) >= self.min_pairs


# ---- reading and validating ---------------------------------------------------------------------
def validate_pairs(obj: object, origin: str) -> list[tuple[str, str]]:
    """Check that ``obj`` is a non-empty list of [source, target] non-empty strings; one clear error per problem."""
    if not isinstance(obj, list):
        raise RelationError(
            f"{origin}: a relation must be a JSON list of [source, target] pairs, got a {type(obj).__name__}; "
            f'write it as [["France", "Paris"], ...].'
        )
    if not obj:
        raise RelationError(f"{origin}: the relation has no pairs; add [source, target] pairs.")
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(obj):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise RelationError(f"{origin}: item {i} ({item!r}) is not a [source, target] pair; give exactly two strings.")
        for side, value in zip(("source", "target"), item, strict=True):
            if not isinstance(value, str):
                raise RelationError(
                    f"{origin}: item {i} has a non-string {side} ({value!r}); quote it, e.g. \"{value}\"."
                )
            if not value.strip():
                raise RelationError(f"{origin}: item {i} has an empty {side}; remove the pair or fill it in.")
        pairs.append((item[0], item[1]))
    return pairs


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 with or without a byte-order mark, else one clear error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        at = err.start + len(data) - len(err.object)  # utf-8-sig reports offsets after the BOM
        line = data.count(b"\n", 0, at) + 1
        src, dst = shlex.quote(path.name), shlex.quote(f"utf8_{path.name}")
        raise RelationError(
            f"{path} is not UTF-8 text (byte 0x{data[at]:02x} at offset {at}, line {line}); "
            f"re-save it as UTF-8 (for a Latin-1 file: `iconv -f latin1 -t utf-8 {src} > {dst}`)."
        ) from None


DELIMITERS = {",": "commas", "\t": "tabs", ";": "semicolons"}


def _delimiter(text: str, suffix: str) -> str:
    """The delimiter the header line (the first non-blank one) holds most often; else tab for .tsv, comma."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    found = max(DELIMITERS, key=header.count)
    return found if header.count(found) else ("\t" if suffix == ".tsv" else ",")


def _read_csv(path: Path) -> list[list[str]]:
    text = _read_text(path)
    sep = _delimiter(text, path.suffix.lower())
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text, newline=""), delimiter=sep)]
    rows = [row for row in rows if any(row)]  # blank lines
    header = rows[0] if rows else []
    if not {"source", "target"} <= set(header):
        seen = "the columns " + ", ".join(repr(c) for c in header) if header else "no columns"
        raise RelationError(f"{path}: a CSV relation needs a header with 'source' and 'target' columns; its header, "
                            f"split at {DELIMITERS[sep]}, has {seen}; rename them.")
    cols = [header.index("source"), header.index("target")]
    return [[row[c] if c < len(row) else "" for c in cols] for row in rows[1:]]


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read and validate a relation file (``.json`` list of pairs, or ``.csv`` / ``.tsv`` with source,target)."""
    path = Path(path)
    _not_a_folder(path)
    if not path.is_file():
        raise RelationError(f"{path}: no such relation file; check the path.")
    if path.suffix.lower() in (".csv", ".tsv"):
        obj: object = _read_csv(path)
    else:
        try:
            obj = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise RelationError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix the syntax.") from None
    return validate_pairs(obj, str(path))


def _not_a_folder(path: Path) -> None:
    if path.is_dir():
        raise RelationError(f"{path} is a folder, not a relation file; pass a .json, .csv or .tsv file of pairs.")


def dedupe_pairs(pairs: Iterable[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    """The pairs without repeats (first occurrence kept, order kept); warns how many were dropped."""
    pairs = [tuple(p) for p in pairs]
    kept = list(dict.fromkeys(pairs))
    if dropped := len(pairs) - len(kept):
        log.warning("relation %s: dropped %d duplicate pairs (kept the first of each)", name, dropped)
    return kept


def duplicate_sources(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Sources that occur more than once (a source should map to one target)."""
    counts = Counter(s for s, _ in pairs)
    return sorted(s for s, n in counts.items() if n > 1)


# ---- metadata ---------------------------------------------------------------------------------------
def read_metadata(data_dir: str | Path | None = None) -> dict[str, dict]:
    """The ``relations`` mapping of ``relations.json`` (name -> metadata)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    path = data_dir / "relations.json"
    if not path.is_file():
        raise RelationError(f"{path} is missing; point {RELATIONS_ENV} at a folder with relations.json.")
    return json.loads(path.read_text(encoding="utf-8"))["relations"]


def list_relations(category: str | None = None, data_dir: str | Path | None = None) -> list[str]:
    """Names of the shipped relations (optionally of one category), in metadata order."""
    meta = read_metadata(data_dir)
    return [n for n, m in meta.items() if category is None or m["category"] == category]


def load(name_or_path: str | Path, data_dir: str | Path | None = None,
         copying: bool | None = None) -> Relation:
    """Load a shipped relation by name, or any relation file by path (JSON pairs, CSV or TSV).

    ``copying`` overrides the copying flag (k = 1); by default a shipped relation takes it from its
    metadata and a file of your own is a copying relation when its name contains "copying".
    """
    path = Path(name_or_path)
    if path.suffix.lower() in (".json", ".csv", ".tsv") or path.is_file():
        pairs = dedupe_pairs(read_pairs(path), path.stem)
        is_copying = "copying" in path.stem.lower() if copying is None else copying
        rel = Relation(name=path.stem, pairs=tuple(pairs), copying=is_copying, path=path,
                       duplicate_sources=tuple(duplicate_sources(pairs)))
    else:
        data_dir = Path(data_dir) if data_dir else default_data_dir()
        meta = read_metadata(data_dir)
        name = str(name_or_path)
        if name not in meta:
            _not_a_folder(path)
            raise RelationError(f"Unknown relation '{name}'; known relations: {', '.join(meta)}.")
        m = meta[name]
        file = data_dir / m["file"]
        pairs = dedupe_pairs(read_pairs(file), name)
        rel = Relation(
            name=name,
            pairs=tuple(pairs),
            category=m["category"],
            display_name=m["display_name"],
            copying=bool(m["copying"]) if copying is None else copying,
            multi_token=bool(m.get("multi_token", False)),
            causal_template=m.get("causal_template"),
            provenance=m.get("provenance"),
            path=file,
            duplicate_sources=tuple(duplicate_sources(pairs)),
        )
    if rel.duplicate_sources:
        shown = ", ".join(rel.duplicate_sources[:5])
        log.warning("relation %s: %d duplicate sources (%s)", rel.name, len(rel.duplicate_sources), shown)
    return rel


def load_all(data_dir: str | Path | None = None) -> list[Relation]:
    return [load(n, data_dir) for n in list_relations(data_dir=data_dir)]


# ---- templates ---------------------------------------------------------------------------------------
def read_templates(data_dir: str | Path | None = None) -> dict:
    """``templates.json``: the generic dynamic-score templates and the multi-token template."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    return json.loads((data_dir / "templates.json").read_text(encoding="utf-8"))


def fill(template: str, source: str) -> str:
    """Substitute ``source`` for ``<X>`` (the template's own space gives the source its leading space)."""
    if template.count(PLACEHOLDER) != 1:
        raise RelationError(f"Template {template!r} must contain {PLACEHOLDER} exactly once.")
    return template.replace(PLACEHOLDER, source)


# ---- tokenisation filters ----------------------------------------------------------------------------
def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def filter_single_token(
    relation: Relation, tokenizer, leading_space: bool = True, min_pairs: int = MIN_PAIRS
) -> TokenizedRelation:
    """Keep the pairs whose source and target are each exactly one token (the paper's filter).

    With ``leading_space`` (the paper's choice) a space is prepended to both sides before
    tokenising without special tokens, so ``("France", "Paris")`` is tested as " France" / " Paris".
    """
    prefix = " " if leading_space else ""
    keep, src, tgt, dropped = [], [], [], []
    for s, t in relation.pairs:
        s_ids, t_ids = _ids(tokenizer, prefix + s), _ids(tokenizer, prefix + t)
        if len(s_ids) == 1 and len(t_ids) == 1:
            keep.append((s, t))
            src.append(s_ids[0])
            tgt.append(t_ids[0])
        else:
            dropped.append((s, t))
    return TokenizedRelation(relation, keep, src, tgt, dropped, min_pairs)


def filter_multi_token(relation: Relation, tokenizer, min_pairs: int = MIN_PAIRS,
                       leading_space: bool = False) -> TokenizedRelation:
    """Pairs for the multi-token experiment (MAPS-SPEC §1.6): the target is one token with a leading
    space, and the source is more than one token.

    ``leading_space=False`` is the paper's filter: the source is tokenised *without* a leading space
    (so words that are one token with a space, e.g. " France", still count when "France" splits; the
    paper's prompts then end in a separately tokenised space, MAPS-SPEC §8.8). ``leading_space=True``
    tokenises the source as it reads after a space in a sentence, so only sources that really are
    several tokens in running text remain. ``source_ids`` are the source's token lists.
    """
    prefix = " " if leading_space else ""
    keep, src, tgt, dropped = [], [], [], []
    for s, t in relation.pairs:
        s_ids, t_ids = _ids(tokenizer, prefix + s), _ids(tokenizer, " " + t)
        if len(s_ids) > 1 and len(t_ids) == 1:
            keep.append((s, t))
            src.append(s_ids)
            tgt.append(t_ids[0])
        else:
            dropped.append((s, t))
    return TokenizedRelation(relation, keep, src, tgt, dropped, min_pairs)


def usable_pairs_table(tokenizers: dict[str, object], relations: Sequence[Relation] | None = None,
                       min_pairs: int = MIN_PAIRS, leading_space: bool = True):
    """DataFrame: per relation, its pair count and the single-token survivors per tokenizer."""
    import pandas as pd

    relations = list(relations) if relations is not None else load_all()
    rows = []
    for rel in relations:
        row = {"relation": rel.name, "category": rel.category, "pairs": len(rel)}
        for label, tok in tokenizers.items():
            row[label] = len(filter_single_token(rel, tok, leading_space=leading_space, min_pairs=min_pairs))
        rows.append(row)
    table = pd.DataFrame(rows)
    for label in tokenizers:
        table[f"{label} >= {min_pairs}"] = table[label] >= min_pairs
    return table
