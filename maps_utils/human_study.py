"""The human study: blind annotation material, a JupyterLab annotator, validation and agreement statistics.

People judge the automatic descriptions of notebook 04 (MAPS-SPEC §4.3). :func:`build_material` draws a seeded
sample of described heads, stratified by layer quartile, shuffles it, and hides which head and which describer each
item comes from: annotators see an item id, the salient operations and the description. The *key* (item → layer,
head, describer) is kept apart, for the analysis. Each annotator answers three questions per item (see
``data/human_study/PROTOCOL.md``): is a pattern observable, is the description correct, and what kind of operation
it is. Answers go to ``data/human_study/annotations/<annotator>.csv``, written atomically after every answer, by
the :class:`Annotator` widget or by filling a sheet in a spreadsheet; views of the same annotator (two JupyterLab
tabs) save under a file lock and merge, so none loses the other's answers.

Nothing here produces judgments: the analysis reads only the files people wrote, and says so when there are none.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .describe import layer_quartile, outcome, quartile_table, show_token, stratified_pick  # noqa: F401 (quartile_table: re-exported for the analysis)
from .errors import MapsError
from .io import atomic_write_text, file_lock
from .manifest import build_manifest, write_manifest

PATTERN = ("yes", "no")
CORRECTNESS = ("correct", "partially", "incorrect")
KINDS = ("semantic", "lexical-morphological", "algorithmic-string", "translation-multilingual", "other")
QUESTIONS = {"pattern_observable": PATTERN, "description_correct": CORRECTNESS, "operation_kind": KINDS}
ANSWER_COLUMNS = ["item", "material", "pattern_observable", "description_correct", "operation_kind", "comment",
                  "annotated_at"]
NO_ANSWER = "(the describer gave no usable answer)"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # whole name (fullmatch): it names the annotator's file
LOCK_TIMEOUT = 30.0  # seconds a save waits for another view of the same annotator file


class AnnotationError(MapsError):
    """An annotation file or value is invalid."""


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
    table = pd.read_csv(path, keep_default_na=False)
    ops = pd.read_csv(ops_path, keep_default_na=False)
    ops["mappings"] = ops.mappings.map(json.loads)
    man_path = path.with_name("descriptions.manifest.json")
    manifest = json.loads(man_path.read_text()) if man_path.is_file() else {}
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
        write_manifest(out / "material.manifest.json", self.manifest)
        return out


def build_material(descriptions: str | Path, n: int | None = 40, seed: int = 0) -> Material:
    """A seeded sample of ``n`` described heads (``None``: all), stratified by layer quartile, shuffled and blind.

    Item ids (``item-001`` …) follow the shuffled order, so neither the id nor the order reveals the layer.
    ``material`` is a hash of what the annotator sees; annotations carry it, so answers given on other material
    (e.g. after the descriptions were regenerated) are caught.
    """
    table, ops, manifest = load_descriptions(descriptions)
    model = (manifest.get("model") or {}).get("model") or Path(descriptions).resolve().parent.name
    n_layers = int(((manifest.get("model") or {}).get("architecture") or {}).get("n_layers") or table.layer.max() + 1)
    table = table.assign(quartile=[layer_quartile(la, n_layers) for la in table.layer])
    rows = list(table.itertuples(index=False))
    if n is None or n >= len(rows):
        picked = rows
    else:
        if n < 1:
            raise ValueError(f"The sample needs at least one head (got n={n}).")
        by_q = [[r for r in rows if r.quartile == q] for q in range(4)]
        picked = stratified_pick(by_q, n, seed)
    rng = np.random.default_rng(seed)
    picked = [picked[i] for i in rng.permutation(len(picked))]
    items, key = [], []
    for i, r in enumerate(picked, start=1):
        o = ops[(ops.layer == r.layer) & (ops["head"] == r.head)]
        if o.empty:
            raise MapsError(f"descriptions.ops.csv has no salient operations for head {r.layer}.{r.head}; rerun notebook 04.")
        text, desc = operations_text(o), description_text(r)
        item, mat = f"item-{i:03d}", _material_hash(text, desc)
        items.append({"item": item, "material": mat, "operations": text, "description": desc})
        key.append({"item": item, "material": mat, "layer": int(r.layer), "head": int(r.head), "quartile": int(r.quartile),
                    "describer": r.describer, "describer_answer": describer_answer(r),
                    "describer_outcome": outcome(r.status, r.parse, r.has_pattern), "parse": r.parse,
                    "status": r.status})
    params = {"descriptions": str(descriptions), "n": n, "seed": seed, "n_items": len(items),
              "describer": sorted(set(table.describer))}
    man = build_manifest(parameters=params, wall_seconds=0.0, model=manifest.get("model"))
    return Material(str(model), pd.DataFrame(items), pd.DataFrame(key), n_layers, man)


def _has_answers(path: Path) -> bool:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return True  # unreadable: leave it alone
    cols = [c for c in QUESTIONS if c in df.columns]
    return bool(cols) and bool((df[cols] != "").any().any())


# ---- annotation files --------------------------------------------------------------------------------
def check_annotator(name: str) -> str:
    """The annotator's name, if it can name a file: 1 to 64 letters, digits, '_', '-' or '.', the first a letter or
    digit, nothing else (no spaces, slashes or newlines)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AnnotationError(f"Annotator name {name!r}: use letters, digits, '_', '-' or '.' only, 1 to 64 of them "
                              "starting with a letter or digit (no spaces, slashes or newlines), since it names the file.")
    return name


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


# ---- statistics --------------------------------------------------------------------------------------
POOLED = "(pooled)"  # cannot be an annotator name


def answered(ann: pd.DataFrame, question: str) -> pd.DataFrame:
    """The rows that answer ``question``, as each statistic counts them:

    * ``pattern_observable``: every row where it is answered;
    * ``description_correct``: answered, on items where the describer gave a pattern — the paper judged the
      descriptions of heads GPT-4o described (MAPS-SPEC §4.3); for "Unclear" items the verdict only restates the
      pattern question;
    * ``operation_kind``: rows with a pattern observable and a kind given.
    """
    if question == "pattern_observable":
        return ann[ann.pattern_observable != ""]
    if question == "description_correct":
        return ann[(ann.description_correct != "") & (ann.describer_answer == "pattern")]
    if question == "operation_kind":
        return ann[(ann.pattern_observable == "yes") & (ann.operation_kind != "")]
    raise ValueError(f"Unknown question {question!r}; use {', '.join(QUESTIONS)}.")


def rates(ann: pd.DataFrame) -> pd.DataFrame:
    """Per annotator and pooled: answers to the pattern question and the share "yes"; answers on described items
    and the correctness shares; answers with a kind and the kind shares (each over :func:`answered` rows)."""
    def share(rows, field, value):
        return (rows[field] == value).mean() if len(rows) else np.nan

    def one(g: pd.DataFrame) -> dict:
        p, c, k = answered(g, "pattern_observable"), answered(g, "description_correct"), answered(g, "operation_kind")
        out = {"pattern_answers": len(p), "pattern_yes": share(p, "pattern_observable", "yes"), "described_answers": len(c)}
        out |= {v: share(c, "description_correct", v) for v in CORRECTNESS}
        out["kind_answers"] = len(k)
        out |= {f"kind:{v}": share(k, "operation_kind", v) for v in KINDS}
        return out

    rows = {name: one(g) for name, g in ann.groupby("annotator", sort=True)}
    rows[POOLED] = one(ann)
    return _counts_as_int(pd.DataFrame(rows).T)


def _counts_as_int(table: pd.DataFrame) -> pd.DataFrame:
    counts = ["pattern_answers", "described_answers", "kind_answers", "items", "no_answer", "both_pattern",
              "describer_only", "people_only", "both_none"]
    return table.astype({c: int for c in counts if c in table.columns} | {
        c: float for c in table.columns if c not in counts})


def cohen_kappa(a: Sequence, b: Sequence, categories: Sequence | None = None) -> float:
    """Cohen's κ of two raters' labels for the same items; NaN when chance agreement is 1 (one category only)."""
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("cohen_kappa needs two equally long, non-empty label lists.")
    cats = list(categories) if categories is not None else sorted(set(a) | set(b))
    po = float(np.mean(a == b))
    pe = sum(float(np.mean(a == c)) * float(np.mean(b == c)) for c in cats)
    return float("nan") if np.isclose(pe, 1.0) else (po - pe) / (1 - pe)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' κ from an items × categories count matrix (every item rated by the same number of raters)."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=1)
    if counts.ndim != 2 or len(counts) == 0 or not np.allclose(n, n[0]) or n[0] < 2:
        raise ValueError("fleiss_kappa needs a non-empty items x categories matrix with the same number (>= 2) of "
                         "ratings per item.")
    n = n[0]
    p_i = (np.sum(counts**2, axis=1) - n) / (n * (n - 1))
    p_j = counts.sum(axis=0) / counts.sum()
    p_bar, pe = p_i.mean(), np.sum(p_j**2)
    return float("nan") if np.isclose(pe, 1.0) else float((p_bar - pe) / (1 - pe))


def kappa(wide: pd.DataFrame, categories: Sequence[str]) -> float:
    """κ of an items × annotators table of labels: Cohen's for two annotators, Fleiss' for more."""
    if wide.shape[1] == 2:
        return cohen_kappa(wide.iloc[:, 0], wide.iloc[:, 1], categories)
    counts = np.stack([(wide == c).sum(axis=1).to_numpy() for c in categories], axis=1)
    return fleiss_kappa(counts)


def agreement(ann: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Inter-annotator agreement per question, over the items answered (:func:`answered`) by every annotator who
    answered that question: method (Cohen's κ for two annotators, Fleiss' for more), annotators, items, raw
    agreement, κ, and a percentile bootstrap interval over items (seeded). Resamples whose κ is undefined (all
    labels one category) are left out; ``boot_valid`` counts the rest. Fewer than two annotators or items: NaN."""
    rng = np.random.default_rng(seed)
    rows = []
    for field, cats in QUESTIONS.items():
        sub = answered(ann, field)
        wide = sub.pivot(index="item", columns="annotator", values=field).dropna() if len(sub) else pd.DataFrame()
        m, n_items = wide.shape[1], len(wide)
        row = {"question": field, "method": {0: "-", 1: "-", 2: "Cohen"}.get(m, "Fleiss"), "annotators": m,
               "items": n_items, "raw_agreement": np.nan, "kappa": np.nan, "ci_low": np.nan, "ci_high": np.nan,
               "boot_valid": 0}
        if m >= 2 and n_items >= 2:
            row["raw_agreement"] = float((wide.nunique(axis=1) == 1).mean())
            row["kappa"] = kappa(wide, cats)
            boots = np.array([kappa(wide.iloc[rng.integers(0, n_items, n_items)], cats) for _ in range(n_boot)])
            boots = boots[np.isfinite(boots)]
            row["boot_valid"] = len(boots)
            if len(boots):
                row["ci_low"], row["ci_high"] = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        rows.append(row)
    return pd.DataFrame(rows)


def describer_vs_people(ann: pd.DataFrame) -> pd.DataFrame:
    """Did the describer's pattern / "Unclear" match people's "pattern observable" yes / no? Over items where the
    describer gave a usable answer (``no_answer`` counts the answers left out because it gave none); one row per
    annotator and pooled: items, agreement, Cohen's κ and the four cells."""
    def one(g):
        usable = g[(g.describer_answer != "none") & (g.pattern_observable != "")]
        d = np.where(usable.describer_answer == "pattern", "yes", "no")
        p = usable.pattern_observable.to_numpy()
        return {"items": len(usable), "no_answer": int((g.describer_answer == "none").sum()),
                "agreement": float(np.mean(d == p)) if len(usable) else np.nan,
                "kappa": cohen_kappa(d, p, PATTERN) if len(usable) else np.nan,
                "both_pattern": int(((d == "yes") & (p == "yes")).sum()),
                "describer_only": int(((d == "yes") & (p == "no")).sum()),
                "people_only": int(((d == "no") & (p == "yes")).sum()),
                "both_none": int(((d == "no") & (p == "no")).sum())}

    rows = {name: one(g) for name, g in ann.groupby("annotator", sort=True)}
    rows[POOLED] = one(ann)
    return _counts_as_int(pd.DataFrame(rows).T)


# ---- the JupyterLab annotator -------------------------------------------------------------------------
class Annotator:
    """One item at a time, with buttons for the three answers, a comment box, back / next and progress.

    Every answer is saved at once (atomically) to ``<folder>/<annotator>.csv``; reopening resumes at the first
    item not yet answered, in the annotator's own shuffled order. ``display(annotator.widget)`` shows it; the
    methods (:meth:`go`, :meth:`next`, :meth:`back`) drive it from code too.
    """

    def __init__(self, material: Material, annotator: str, folder: str | Path = "data/human_study/annotations",
                 seed: int = 0):
        import ipywidgets as w

        check_annotator(annotator)
        self.material = material
        self.annotator = annotator
        self.store = AnnotationStore(Path(folder) / f"{annotator}.csv", material)
        self.order = list(material.sheet(annotator, seed).item)
        self._items = material.items.set_index("item")
        self._loading = False
        self.title = w.HTML()
        self.progress = w.IntProgress(min=0, max=len(self.order), description="answered")
        self.operations = w.HTML()
        self.description = w.HTML()
        self.buttons = {
            "pattern_observable": w.ToggleButtons(options=list(PATTERN), value=None,
                                                  description="Pattern observable?"),
            "description_correct": w.ToggleButtons(options=list(CORRECTNESS), value=None,
                                                   description="Description is"),
            "operation_kind": w.ToggleButtons(options=list(KINDS), value=None, description="Kind"),
        }
        for b in self.buttons.values():
            b.style.description_width = "140px"
        self.comment = w.Textarea(placeholder="optional comment", continuous_update=False, layout=w.Layout(width="95%", height="48px"))
        self.back_button = w.Button(description="◀ back")
        self.next_button = w.Button(description="next ▶", button_style="primary")
        self.status = w.HTML()
        for field, b in self.buttons.items():
            b.observe(lambda change, f=field: self._changed(f, change["new"]), names="value")
        self.comment.observe(lambda change: self._changed("comment", change["new"]), names="value")
        self.back_button.on_click(lambda _: self.back())
        self.next_button.on_click(lambda _: self.next())
        self.widget = w.VBox([self.title, self.progress, self.operations, self.description, *self.buttons.values(),
                              self.comment, w.HBox([self.back_button, self.next_button]), self.status])
        todo = [i for i, item in enumerate(self.order) if not self.store.complete(item)]
        self.go(todo[0] if todo else len(self.order) - 1)

    @property
    def item(self) -> str:
        return self.order[self.pos]

    def answered(self) -> int:
        return sum(self.store.complete(i) for i in self.order)

    def go(self, pos: int) -> None:
        import html

        self.pos = max(0, min(len(self.order) - 1, pos))
        row = self._items.loc[self.item]
        saved = self.store.rows.get(self.item, {})
        self._loading = True
        try:
            for field, b in self.buttons.items():
                b.value = saved.get(field) or None
            self.comment.value = saved.get("comment", "")
        finally:
            self._loading = False
        self.title.value = f"<b>{html.escape(self.annotator)}</b> · {self.item} ({self.pos + 1} of {len(self.order)})"
        self.operations.value = ("<p>Salient tokens and their top mappings (<code>token: m1, m2, …</code>):</p>"
                                 f"<pre>{html.escape(row.operations)}</pre>")
        self._description = row.description
        self._refresh()

    def next(self) -> None:
        self.go(self.pos + 1)

    def back(self) -> None:
        self.go(self.pos - 1)

    def _changed(self, field: str, value) -> None:
        if self._loading:
            return
        self.store.answer(self.item, **{field: value or ""})
        if field == "pattern_observable" and value == "no":  # the store cleared the kind; so does the view
            self._loading = True
            try:
                self.buttons["operation_kind"].value = None
            finally:
                self._loading = False
        self._refresh()

    def _refresh(self) -> None:
        import html

        if self.buttons["pattern_observable"].value is None:  # judge the operations before reading the description
            self.description.value = "<p><i>Answer the first question to see the description.</i></p>"
        else:
            self.description.value = f"<p><b>Description:</b> {html.escape(self._description)}</p>"
        done = self.answered()
        self.progress.value = done
        need_kind = self.buttons["pattern_observable"].value != "no"
        self.buttons["operation_kind"].disabled = not need_kind
        state = "answered" if self.store.complete(self.item) else "not answered yet"
        self.status.value = (f"{done} of {len(self.order)} answered; this item: {state}. "
                             f"Saved to <code>{self.store.path}</code>.")
