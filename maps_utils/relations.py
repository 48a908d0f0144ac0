"""Relation datasets: load, validate, tokenisation filters, categories and templates.

A relation is a list of ``[source, target]`` string pairs (the common MAPS JSON format), or a CSV
with ``source,target`` columns. The shipped relations live in ``data/relations/`` with one
metadata file, ``relations.json``, giving each relation's category, display name, whether it is
a copying relation (k = 1 instead of 10 in the paper), its causal-experiment template, its
provenance, and its pair count and SHA-256.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MapsError

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

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def sources(self) -> list[str]:
        return [s for s, _ in self.pairs]

    @property
    def targets(self) -> list[str]:
        return [t for _, t in self.pairs]

    def k(self, k_copying: int = 1, k_other: int = 10) -> int:
        """The paper's top-k for this relation: 1 for copying relations, 10 otherwise (3/25 for Llama-3.x)."""
        return k_copying if self.copying else k_other


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


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"source", "target"} <= {f.strip() for f in reader.fieldnames}:
            raise RelationError(f"{path}: a CSV relation needs a header with 'source' and 'target' columns.")
        return [[row["source"], row["target"]] for row in reader]


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read and validate a relation file (``.json`` list of pairs or ``.csv`` with source,target)."""
    path = Path(path)
    if not path.is_file():
        raise RelationError(f"{path}: no such relation file; check the path.")
    if path.suffix.lower() == ".csv":
        obj: object = _read_csv(path)
    else:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RelationError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix the syntax.") from None
    return validate_pairs(obj, str(path))


def duplicate_sources(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Sources that occur more than once (a source should map to one target)."""
    counts = Counter(s for s, _ in pairs)
    return sorted(s for s, n in counts.items() if n > 1)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def load(name_or_path: str | Path, data_dir: str | Path | None = None) -> Relation:
    """Load a shipped relation by name, or any relation file by path (JSON pairs or CSV)."""
    path = Path(name_or_path)
    if path.suffix.lower() in (".json", ".csv") or path.is_file():
        pairs = read_pairs(path)
        rel = Relation(name=path.stem, pairs=tuple(pairs), path=path, duplicate_sources=tuple(duplicate_sources(pairs)))
    else:
        data_dir = Path(data_dir) if data_dir else default_data_dir()
        meta = read_metadata(data_dir)
        name = str(name_or_path)
        if name not in meta:
            raise RelationError(f"Unknown relation '{name}'; known relations: {', '.join(meta)}.")
        m = meta[name]
        file = data_dir / m["file"]
        pairs = read_pairs(file)
        rel = Relation(
            name=name,
            pairs=tuple(pairs),
            category=m["category"],
            display_name=m["display_name"],
            copying=bool(m["copying"]),
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
