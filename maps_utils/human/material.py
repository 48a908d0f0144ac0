"""The human study's material: a blind, seeded sample of described heads for people to judge.

People judge the automatic descriptions of notebook 04 (MAPS-SPEC §4.3). :func:`build_material` draws a seeded
sample of described heads, stratified by layer quartile, shuffles it, and hides which head and which describer each
item comes from: annotators see an item id, the salient operations and the description. The *key* (item → layer,
head, describer) is kept apart, for the analysis. The answers (:mod:`maps_utils.human.annotations`), the widget that
collects them (:mod:`maps_utils.human.annotator`) and their statistics (:mod:`maps_utils.human.agreement`) live beside this.

Nothing here produces judgments: the analysis reads only the files people wrote, and says so when there are none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import MapsError
from ..core.io import atomic_write_text
from ..core.manifest import build_manifest, read_manifest, write_manifest
from ..core.params import check_parameters
from ..core.store import read_table
from ..describe.pipeline import outcome, show_token
from ..describe.sampling import layer_quartile, stratified_pick
from .questions import ANSWER_COLUMNS, QUESTIONS, check_annotator

NOTEBOOK_04 = "run notebook 04 again (`make all`, or papermill notebooks/04_salient_descriptions.ipynb)"

NO_ANSWER = "(the describer gave no usable answer)"


# ---- material -------------------------------------------------------------------------------------
def load_descriptions(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``descriptions.csv`` (notebook 04), its ``descriptions.ops.csv`` and manifest, from the same folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "descriptions.csv"
    ops_path = path.with_name("descriptions.ops.csv")
    if not path.is_file() or not ops_path.is_file():
        raise MapsError(f"No descriptions at {path} (with descriptions.ops.csv beside it); run notebook 04 for this "
                        "model first (`make all`, or papermill notebooks/04_salient_descriptions.ipynb).")
    table = read_table(path, NOTEBOOK_04, keep_default_na=False)
    ops = read_table(ops_path, NOTEBOOK_04, keep_default_na=False)
    ops["mappings"] = ops.mappings.map(json.loads)
    manifest = read_manifest(path.with_name("descriptions.manifest.json")) or {}
    table["has_pattern"] = table.has_pattern.astype(str).str.lower().eq("true")
    return table, ops, manifest


def describer_answer(row) -> str:
    """"pattern", "unclear" (a usable answer without a pattern) or "none" (failed, unparsed or without the keys)."""
    o = outcome(row.status, row.parse, row.has_pattern)
    return o if o in ("pattern", "unclear") else "none"


def description_text(row) -> str:
    """What annotators read as the description: the pattern (with the input description), "Unclear", or a note
    that the describer gave no usable answer."""
    answer = describer_answer(row)
    if answer == "none":
        return NO_ANSWER
    if answer == "unclear":
        return "Unclear"
    inputs = str(row.inputs).strip()
    return f"{row.pattern.strip()}" + (f"  (inputs: {inputs})" if inputs and inputs.lower() != "unclear" else "")


def operations_text(ops: pd.DataFrame) -> str:
    """One line per salient token, ``token: m1, m2, …``, tokens shown as in the describer's prompt."""
    return "\n".join(f"{show_token(o.token)}: " + ", ".join(show_token(m) for m in o.mappings)
                     for o in ops.sort_values("rank").itertuples())


def _material_hash(operations: str, description: str) -> str:
    return hashlib.sha256(f"{operations}\n--\n{description}".encode()).hexdigest()[:12]


@dataclass
class Material:
    """A blind study: ``items`` (what annotators see, in shuffled order) and ``key`` (item → head, describer)."""

    model: str
    items: pd.DataFrame  # item, material, operations, description
    key: pd.DataFrame  # item, material, layer, head, quartile, describer, describer_has_pattern, parse
    n_layers: int
    manifest: dict

    def sheet(self, annotator: str, seed: int = 0) -> pd.DataFrame:
        """The annotator's sheet: every item, in an order shuffled for this annotator, with empty answer columns."""
        check_annotator(annotator)
        rng = np.random.default_rng([seed, int(hashlib.sha256(annotator.encode()).hexdigest()[:8], 16)])
        order = rng.permutation(len(self.items))
        sheet = self.items.iloc[order].reset_index(drop=True)
        for col in ANSWER_COLUMNS[2:]:
            sheet[col] = ""
        return sheet

    def write(self, out_dir: str | Path, annotators: Sequence[str] = (), seed: int = 0) -> Path:
        """``items.csv`` (blind), ``key.csv`` (not for annotators), ``sheets/<annotator>.csv`` and a manifest."""
        out = Path(out_dir)
        atomic_write_text(out / "items.csv", self.items.to_csv(index=False))
        atomic_write_text(out / "key.csv", self.key.to_csv(index=False))
        for name in annotators:
            path = out / "sheets" / f"{name}.csv"
            if path.is_file() and _has_answers(path):
                continue  # someone is filling it in: never overwrite answers
            atomic_write_text(path, self.sheet(name, seed).to_csv(index=False))
        write_manifest(out / "material.manifest.json", self.manifest, files=[out / "items.csv", out / "key.csv"])
        return out


def build_material(descriptions: str | Path, n: int | None = 40, seed: int = 0) -> Material:
    """A seeded sample of ``n`` described heads (``None``: all), stratified by layer quartile, shuffled and blind.

    Item ids (``item-001`` …) follow the shuffled order, so neither the id nor the order reveals the layer.
    ``material`` is a hash of what the annotator sees; annotations carry it, so answers given on other material
    (e.g. after the descriptions were regenerated) are caught.
    """
    check_parameters(n_items=n, seed=seed)
    table, ops, manifest = load_descriptions(descriptions)
    model = (manifest.get("model") or {}).get("model") or Path(descriptions).resolve().parent.name
    n_layers = int(((manifest.get("model") or {}).get("architecture") or {}).get("n_layers") or table.layer.max() + 1)
    table = table.assign(quartile=[layer_quartile(la, n_layers) for la in table.layer])
    rows = list(table.itertuples(index=False))
    if n is None or n >= len(rows):
        picked = rows
    else:
        by_q = [[r for r in rows if r.quartile == q] for q in range(4)]
        picked = stratified_pick(by_q, n, seed)
    rng = np.random.default_rng(seed)
    picked = [picked[i] for i in rng.permutation(len(picked))]
    executable = _executable(Path(descriptions))
    items, key = [], []
    for i, r in enumerate(picked, start=1):
        o = ops[(ops.layer == r.layer) & (ops["head"] == r.head)]
        if o.empty:
            raise MapsError(f"descriptions.ops.csv has no salient operations for head {r.layer}.{r.head}; rerun notebook 04.")
        text, desc = operations_text(o), description_text(r)
        ex = executable.get((int(r.layer), int(r.head)))
        extra = {} if ex is None or r.describer == "executable" else {"executable_description": ex["sentence"]}
        item, mat = f"item-{i:03d}", _material_hash(text, desc + "".join(extra.values()))
        items.append({"item": item, "material": mat, "operations": text, "description": desc, **extra})
        key.append({"item": item, "material": mat, "layer": int(r.layer), "head": int(r.head), "quartile": int(r.quartile),
                    "describer": r.describer, "describer_answer": describer_answer(r),
                    "describer_outcome": outcome(r.status, r.parse, r.has_pattern), "parse": r.parse,
                    "status": r.status, "executable_score": None if ex is None else ex["score"],
                    "executable_verified": None if ex is None else ex["verified"]})
    params = {"descriptions": str(descriptions), "n": n, "seed": seed, "n_items": len(items),
              "describer": sorted(set(table.describer))}
    man = build_manifest(parameters=params, wall_seconds=0.0, model=manifest.get("model"))
    return Material(str(model), pd.DataFrame(items), pd.DataFrame(key), n_layers, man)


def _executable(descriptions: Path) -> dict[tuple[int, int], dict]:
    """Notebook 04's executable descriptions beside ``descriptions`` (``descriptions.executable.csv``), by head."""
    path = (descriptions if descriptions.is_dir() else descriptions.parent) / "descriptions.executable.csv"
    if not path.is_file():
        return {}
    t = read_table(path, NOTEBOOK_04, keep_default_na=False)
    return {(int(r.layer), int(r.head)): {"sentence": str(r.sentence), "score": float(r.score),
                                          "verified": str(r.verified).lower() == "true"} for r in t.itertuples()}


def _has_answers(path: Path) -> bool:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return True  # unreadable: leave it alone
    cols = [c for c in QUESTIONS if c in df.columns]
    return bool(cols) and bool((df[cols] != "").any().any())
