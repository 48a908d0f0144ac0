"""Annotation files of the human study: one CSV per annotator, validated strictly, saved under a file lock.

Each annotator answers three questions per item (``data/human_study/PROTOCOL.md``): is a pattern observable, is the
description correct, and what kind of operation it is. Answers go to ``data/human_study/annotations/<annotator>.csv``,
written atomically after every answer by the annotator widget (:mod:`maps_utils.human.annotator`) or by filling a sheet in
a spreadsheet; views of the same annotator (two JupyterLab tabs) save under a file lock and merge, so none loses the
other's answers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from ..core.io import atomic_write_text, file_lock
from .material import Material
from .questions import (
    ANSWER_COLUMNS,
    QUESTIONS,
    AnnotationError,
)

LOCK_TIMEOUT = 30.0  # seconds a save waits for another view of the same annotator file


# ---- annotation files --------------------------------------------------------------------------------
def _answered_at(row: dict) -> datetime:
    """When a row was answered (its ``annotated_at``); rows without a readable time count as oldest."""
    try:
        when = datetime.fromisoformat(str(row.get("annotated_at") or ""))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class AnnotationStore:
    """One annotator's answers, ``{item: row}``, saved atomically to CSV after every change.

    Reading an existing file resumes it; a crash mid-write leaves the previous file whole (write to a temporary
    file, then rename). Several views of one file (two JupyterLab tabs, two processes) save under a file lock
    (``.<annotator>.csv.lock`` beside it): each save re-reads the file, merges it with this view's answers (per item
    the most recently answered row wins, by ``annotated_at``) and writes the result, so no view loses another's.
    """

    def __init__(self, path: str | Path, material: Material | None = None):
        self.path = Path(path)
        self.material = material
        self.rows: dict[str, dict] = {}
        self._changed: set[str] = set()  # items answered in this view since its last save
        if self.path.is_file():
            df = read_annotations(self.path, material)
            self.rows = {r["item"]: r for r in df.to_dict("records")}

    def answer(self, item: str, **answers) -> dict:
        """Set some answers of one item and save at once. Under the file's lock the file is re-read first, so
        answers saved meanwhile by another view of the same file are kept. Answering "no" to the pattern question
        clears the kind."""
        if self.material is not None and item not in set(self.material.items.item):
            raise AnnotationError(f"{item!r} is not an item of this study.")
        values = {}
        for field, value in answers.items():
            if field not in QUESTIONS and field != "comment":
                raise AnnotationError(f"Unknown answer field {field!r}; use {', '.join([*QUESTIONS, 'comment'])}.")
            value = "" if value is None else str(value)
            if field in QUESTIONS and value and value not in QUESTIONS[field]:
                raise AnnotationError(f"{field}={value!r}: use one of {', '.join(QUESTIONS[field])}.")
            values[field] = value
        with self._locked():
            self._merge_from_disk()
            row = dict(self.rows.get(item) or {c: "" for c in ANSWER_COLUMNS} | {"item": item})
            if self.material is not None:
                row["material"] = self.material.items.set_index("item").material[item]
            row |= values
            if row.get("pattern_observable") == "no":
                row["operation_kind"] = ""
            row["annotated_at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
            self.rows[item] = row
            self._changed.add(item)
            self._write()
        return row

    def complete(self, item: str) -> bool:
        r = self.rows.get(item)
        return bool(r) and is_complete(r)

    def save(self) -> Path:
        """Merge with the file on disk and write it, under the file's lock (see the class)."""
        with self._locked():
            self._merge_from_disk()
            return self._write()

    def _locked(self):
        busy = AnnotationError(f"{self.path} stayed locked by another view of this annotator for {LOCK_TIMEOUT:.0f} s; "
                               "close the other annotator tab or process, then answer again.")
        return file_lock(self.path.with_name(f".{self.path.name}.lock"), LOCK_TIMEOUT, busy)

    def _merge_from_disk(self) -> None:
        """Per item, keep the most recently answered of the file's row and this view's; on a tie the file's, unless
        this view answered the item since its last save. Items on one side only are kept."""
        if not self.path.is_file():
            return
        disk = {r["item"]: r for r in read_annotations(self.path, self.material).to_dict("records")}
        merged = dict(disk)
        for item, row in self.rows.items():
            if item not in disk or (_answered_at(row), item in self._changed) > (_answered_at(disk[item]), False):
                merged[item] = row
        self.rows = merged

    def _write(self) -> Path:
        df = pd.DataFrame(list(self.rows.values()), columns=ANSWER_COLUMNS)
        path = atomic_write_text(self.path, df.to_csv(index=False))
        self._changed.clear()
        return path


def is_complete(row) -> bool:
    """An item is answered when pattern and correctness are given, and the kind too when a pattern is observable."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    return bool(get("pattern_observable")) and bool(get("description_correct")) and (
        get("pattern_observable") == "no" or bool(get("operation_kind")))


def read_annotations(path: str | Path, material: Material | None = None) -> pd.DataFrame:
    """Read and validate one annotator's file: the columns, every value, no duplicate item, and (given the
    material) every item known and answered on the same material. Errors name the file, row and fix."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise AnnotationError(f"{path} is empty; remove it, or restore it from your sheet.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not a readable CSV ({err}); fix or remove the file.") from None
    missing = [c for c in ("item", *QUESTIONS) if c not in df.columns]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {', '.join(missing)}; an annotation file needs "
                              f"{', '.join(ANSWER_COLUMNS[:-1])}.")
    for col in ANSWER_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = df[ANSWER_COLUMNS]
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()
    df = df[(df != "").any(axis=1)].reset_index(drop=True)  # blank spreadsheet rows
    df[list(QUESTIONS)] = df[list(QUESTIONS)].apply(lambda s: s.str.lower())
    for i, row in enumerate(df.itertuples(index=False), start=2):  # row 1 is the header
        for field, allowed in QUESTIONS.items():
            value = getattr(row, field)
            if value and value not in allowed:
                raise AnnotationError(f"{path}, row {i} ({row.item}): {field}={value!r} is not one of "
                                      f"{', '.join(allowed)}.")
    for i, row in enumerate(df.itertuples(index=False), start=2):
        if row.pattern_observable == "no" and row.operation_kind:
            raise AnnotationError(f"{path}, row {i} ({row.item}): operation_kind={row.operation_kind!r} with no pattern "
                                  "observable; leave the kind empty when pattern_observable is no.")
        if not row.item:
            raise AnnotationError(f"{path}, row {i}: the item id is empty; keep the item column from your sheet.")
    dup = df.item[df.item.duplicated()].unique().tolist()
    if dup:
        raise AnnotationError(f"{path}: item(s) {', '.join(dup)} appear more than once; keep one row per item.")
    if material is not None:
        known = material.items.set_index("item").material
        unknown = sorted(set(df.item) - set(known.index))
        if unknown:
            raise AnnotationError(f"{path}: unknown item(s) {', '.join(unknown[:5])}; these answers belong to another "
                                  "study (model, sample size or seed).")
        answered = (df[list(QUESTIONS)] != "").any(axis=1)
        nomat = df[answered & (df.material == "")].item.tolist()
        if nomat:
            raise AnnotationError(f"{path}: item(s) {', '.join(nomat[:5])} have answers but no material hash; keep the "
                                  "material column from your sheet (it ties each answer to what you were shown).")
        stale = df[(df.material != "") & (df.material != df.item.map(known))].item.tolist()
        if stale:
            raise AnnotationError(f"{path}: item(s) {', '.join(stale[:5])} were answered on different material "
                                  "(the descriptions or the sample changed since); annotate the new material in a new "
                                  "file, or regenerate the old material.")
    return df


def load_annotations(folder: str | Path, material: Material) -> pd.DataFrame:
    """Every ``<annotator>.csv`` in ``folder``, validated, as one long table (annotator, item, answers) joined with
    the key (layer, head, quartile, ``describer_answer``); rows with no answer at all are left out. Each statistic
    then uses the rows that answer its question (see :func:`answered`)."""
    folder = Path(folder)
    frames = []
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        df = read_annotations(path, material)
        frames.append(df.assign(annotator=path.stem))
    cols = ["annotator", *ANSWER_COLUMNS, "layer", "head", "quartile", "describer_answer"]
    if not frames:
        return pd.DataFrame(columns=cols)
    long = pd.concat(frames, ignore_index=True)
    long = long[(long[list(QUESTIONS)] != "").any(axis=1)]
    key = material.key[["item", "layer", "head", "quartile", "describer_answer"]]
    return long.merge(key, on="item", how="left")[cols].reset_index(drop=True)
