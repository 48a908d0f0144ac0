"""Detection scoring of head descriptions: does a description pick out the head's own held-out operations?

Adapted from detection scoring of automatic feature descriptions to attention heads. For every described head:

* **positives** are its salient operations the describer never saw (ranks ``n_salient`` to ``n_evidence - 1``,
  i.e. 16-40 by default), each a source token with its top mappings;
* **negatives** are as many rows drawn (seeded) from *other* heads' salient operations;
* a **judge** decides from the description alone which rows follow it: an LLM through the same client and cache
  as the describer for LLM descriptions (:func:`judge_prompt`), the description's own predicate for rule
  descriptions (:mod:`maps_utils.describe.rules`);
* the **score** is the balanced accuracy (mean of the hit rate on positives and the rejection rate on negatives);
  a description with no pattern ("Unclear", unparsed, failed) selects no row and scores 0.5 without a judge call;
* a **shuffled control** scores another head's description (drawn, seeded, among the other heads with a pattern)
  on the same rows; it should sit near 0.5.

A head is **verified** when its score is at least ``threshold`` (0.75).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.io import atomic_write_text
from ..core.manifest import build_manifest, call_arguments, write_manifest
from ..core.store import RunOptions, read_table, result_folder
from ..relations import list_relations, load_all
from ..static.scores import static_scores
from .detection_stats import THRESHOLD, detection_summary, verified_by_quartile
from .pipeline import show_token
from .rules import predicate_library, row_holds

JUDGE_VERSION = 1
JUDGE_PROMPT = """\
Below are numbered rows. Each row shows an input string and the {k} output strings some function mapped it to, \
written as "input: output1, output2, …". Strings are usually words or parts of words; a leading space belongs to \
the string.

{rows}

A description of a function:
Inputs: {inputs}
Function: {pattern}

Which rows follow this description, that is, show an input of the kind described mapped the way described? {answer}
"""
ANSWER_FORMS = {
    "list": 'Answer only with a JSON object {"matching_rows": [<row numbers>]}, listing every row that follows the '
            'description (an empty list if none does).',
    "lines": 'Answer every row on its own line, in order, as "<row number>: yes" or "<row number>: no".',
}
"""How the judge answers: a JSON list (GPT-4o, servers), or one yes/no line per row (the local model, whose
yes/no logits are read at each line)."""


def judge_schema(n_rows: int) -> dict:
    """The judge's answer: a list of distinct row numbers 1..n_rows."""
    return {"type": "object", "required": ["matching_rows"],
            "properties": {"matching_rows": {"type": "array", "items": {"enum": list(range(1, n_rows + 1))},
                                             "maxItems": n_rows}}}


# ---- evidence -----------------------------------------------------------------------------------------
def _rows(ops: pd.DataFrame) -> dict[tuple[int, int], list[tuple[str, list[str]]]]:
    out: dict = {}
    for r in ops.sort_values(["layer", "head", "rank"]).itertuples():
        maps = json.loads(r.mappings) if isinstance(r.mappings, str) else list(r.mappings)
        out.setdefault((int(r.layer), int(r.head)), []).append((str(r.token), [str(m) for m in maps]))
    return out


def evidence_rows(evidence: pd.DataFrame, ops: pd.DataFrame, *, seed: int = 0,
                  negatives: pd.DataFrame | None = None) -> dict[tuple[int, int], list[dict]]:
    """Per head, its held-out rows (``label`` True) and as many rows of other heads (``label`` False; shown or
    held-out rows whose source is none of the head's sources), in a seeded random order. ``negatives``: the
    salient operations to draw them from (default: those of the other heads in ``ops`` and ``evidence``)."""
    held, shown = _rows(evidence), _rows(ops)
    if negatives is not None:
        shown, held_neg = _rows(negatives), {}
    else:
        held_neg = held
    rng = np.random.default_rng(seed)
    out = {}
    for head in sorted(held):
        pos = held[head]
        mine = {s for s, _ in pos} | {s for s, _ in _rows(ops).get(head, [])}
        pool = [row for other in sorted(set(held_neg) | set(shown)) if other != head
                for row in shown.get(other, []) + held_neg.get(other, []) if row[0] not in mine]
        take = rng.choice(len(pool), size=min(len(pos), len(pool)), replace=False) if pool else []
        rows = [{"source": s, "mappings": m, "label": True} for s, m in pos]
        rows += [{"source": pool[i][0], "mappings": pool[i][1], "label": False} for i in take]
        out[head] = [rows[i] for i in rng.permutation(len(rows))]
    return out


def partners(has_pattern: dict[tuple[int, int], bool], *, seed: int = 0) -> dict[tuple[int, int], tuple | None]:
    """For each head, another head with a pattern whose description serves as its shuffled control (seeded);
    None when no other head has one."""
    rng = np.random.default_rng(seed)
    with_pattern = sorted(h for h, p in has_pattern.items() if p)
    out = {}
    for head in sorted(has_pattern):
        others = [h for h in with_pattern if h != head]
        out[head] = others[int(rng.integers(len(others)))] if others else None
    return out


# ---- judging ------------------------------------------------------------------------------------------
def judge_prompt(rows: Sequence[dict], inputs: str, pattern: str, answer: str = "list") -> str:
    """The LLM judge's prompt. The rows come first, so the true and the shuffled description of one head share
    the prompt's longest part (a local model evaluates it once)."""
    lines = "\n".join(f"{i}. {show_token(r['source'])}: " + ", ".join(show_token(m) for m in r["mappings"])
                      for i, r in enumerate(rows, start=1))
    k = len(rows[0]["mappings"]) if rows else 0
    return JUDGE_PROMPT.format(k=k, rows=lines, inputs=inputs or "(not described)", pattern=pattern,
                               answer=ANSWER_FORMS[answer])


def parse_judge(text: str, n_rows: int) -> dict | None:
    """A judge's answer: ``{"selected": {row numbers}}`` from ``matching_rows`` (the JSON object's, else the first
    JSON object or list in the text), or ``{"margins": [...]}`` from the local judge's yes/no logit margins;
    None when the text holds neither."""
    text = text or ""
    candidates = [text.strip()] + [text[m.start():] for m in re.finditer(r"[\[{]", text)]
    decoder = json.JSONDecoder()
    for c in candidates:
        try:
            obj, _ = decoder.raw_decode(c)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("margins"), list) and len(obj["margins"]) == n_rows:
            return {"margins": [float(x) for x in obj["margins"]]}
        if isinstance(obj, dict):
            obj = next((v for k, v in obj.items() if "row" in k.lower() or "match" in k.lower()), None)
        if isinstance(obj, list):
            return {"selected": {int(x) for x in obj if isinstance(x, (int, float, str)) and str(x).strip().isdigit()
                                 and 1 <= int(x) <= n_rows}}
    return None


def selection(answer: dict, n_select: int, n_rows: int) -> list[bool]:
    """Which rows a judge selects: its listed rows; or, from margins, the ``n_select`` rows with the largest
    margins (the local judge is calibrated to the evidence's known share of positives; ties go to earlier rows)."""
    if "selected" in answer:
        return [i in answer["selected"] for i in range(1, n_rows + 1)]
    order = sorted(range(len(answer["margins"])), key=lambda i: (-answer["margins"][i], i))
    top = set(order[:n_select])
    return [i in top for i in range(len(answer["margins"]))]


def balanced_accuracy(labels: Sequence[bool], selected: Sequence[bool]) -> float:
    """Mean of the share of positives selected and the share of negatives not selected."""
    y, s = np.asarray(labels, bool), np.asarray(selected, bool)
    if not y.any() or y.all():
        return float("nan")
    return float((s[y].mean() + (~s[~y]).mean()) / 2)


def _judge_llm(describer, rows_by_head: dict, descriptions: dict, pairs: list[tuple], progress: bool) -> dict:
    """Ask the judge for every (head, description head) pair; ``{pair: parsed answer or None}``. Pairs are asked
    head by head (true description, then control), so the local model reuses each head's rows."""
    local = describer.endpoint.kind == "local"
    out = {}
    for n in sorted({len(rows_by_head[h]) for h, _ in pairs}):
        group = sorted(p for p in pairs if len(rows_by_head[p[0]]) == n)
        prompts = {p: judge_prompt(rows_by_head[p[0]], *descriptions[p[1]], answer="lines" if local else "list")
                   for p in group}
        got = describer.complete_all(prompts, schema=judge_schema(n), max_tokens=4 * n + 16, rows=n if local else None,
                                     version=JUDGE_VERSION, what="judging", progress=progress)
        out |= {p: parse_judge(r["raw"], n) if r["status"] == "ok" else None for p, r in got.items()}
    return out


def _score(rows: list[dict], answer: dict | None) -> float:
    if answer is None:
        return float("nan")
    labels = [r["label"] for r in rows]
    return balanced_accuracy(labels, selection(answer, sum(labels), len(rows)))


def score_llm(describer, table: pd.DataFrame, rows_by_head: dict, *, seed: int = 0,
              progress: bool = True) -> pd.DataFrame:
    """Detection scores of the LLM descriptions in ``table`` (notebook 04's descriptions): one row per head."""
    has = {(int(r.layer), int(r.head)): str(r.has_pattern).lower() == "true" for r in table.itertuples()
           if (int(r.layer), int(r.head)) in rows_by_head}
    descriptions = {(int(r.layer), int(r.head)): (str(r.inputs), str(r.pattern)) for r in table.itertuples()}
    partner = partners(has, seed=seed)
    pairs = [(h, h) for h in has if has[h]] + [(h, partner[h]) for h in has if partner[h] is not None]
    selected = _judge_llm(describer, rows_by_head, descriptions, pairs, progress) if pairs else {}
    return _table(has, partner, rows_by_head, lambda h, d: _score(rows_by_head[h], selected.get((h, d))), "llm")


def score_rules(rules: pd.DataFrame, rows_by_head: dict, library, *, seed: int = 0) -> pd.DataFrame:
    """Detection scores of the rule descriptions (``describe.DescriptionResult.rules``): the judge is each
    description's own predicate (any chosen predicate holds on the row)."""

    by_name = {p.name: p for p in library}
    chosen = {(int(r.layer), int(r.head)): [by_name[n] for n in json.loads(r.predicates)] for r in rules.itertuples()}
    has = {h: bool(p) for h, p in chosen.items() if h in rows_by_head}
    partner = partners(has, seed=seed)

    def score(head, desc_head):
        rows = rows_by_head[head]
        sel = [any(row_holds(p, r["source"], r["mappings"]) for p in chosen[desc_head]) for r in rows]
        return balanced_accuracy([r["label"] for r in rows], sel)

    return _table(has, partner, rows_by_head, score, "rules")


def _table(has: dict, partner: dict, rows_by_head: dict, score, describer: str) -> pd.DataFrame:
    out = []
    for head in sorted(has):
        rows = rows_by_head[head]
        s = score(head, head) if has[head] else 0.5  # no pattern selects no row: balanced accuracy 0.5
        c = score(head, partner[head]) if partner[head] is not None else float("nan")
        out.append({"describer": describer, "layer": head[0], "head": head[1], "has_pattern": has[head],
                    "n_positives": sum(r["label"] for r in rows), "n_negatives": sum(not r["label"] for r in rows),
                    "score": s, "control_head": f"{partner[head][0]}.{partner[head][1]}" if partner[head] else "",
                    "control_score": c, "judged": "no pattern" if not has[head] else
                    ("failed" if np.isnan(s) else "judged")})
    return pd.DataFrame(out)


# ---- the whole step -----------------------------------------------------------------------------------
@dataclass
class DetectionResult:
    """Per-head detection scores of both describers, their summary and the manifest."""

    model: str
    scores: pd.DataFrame
    manifest: dict
    n_layers: int
    threshold: float = THRESHOLD
    name: str = "detection"

    def summary(self, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
        return detection_summary(self.scores, threshold=self.threshold, n_boot=n_boot, seed=seed)

    def by_quartile(self) -> pd.DataFrame:
        return verified_by_quartile(self.scores, self.n_layers, threshold=self.threshold)

    def verified_chart(self) -> tuple[pd.DataFrame, list[str]]:
        """:meth:`by_quartile` as :func:`maps_utils.report.plots.stacked_quartiles` takes it, and its share columns."""
        q = self.by_quartile()
        cols = [c for c in q.columns if c.startswith("verified_")]
        return q.set_index("quartile").rename(columns={"n_heads": "n"})[["layers", "n", *cols]], cols

    def write(self, results_dir: str | Path) -> Path:
        out = result_folder(results_dir, self.model)
        atomic_write_text(out / f"{self.name}.csv", self.scores.to_csv(index=False))
        atomic_write_text(out / f"{self.name}.summary.csv", self.summary().to_csv(index=False))
        write_manifest(out / f"{self.name}.manifest.json", self.manifest,
                       files=[out / f"{self.name}.csv", out / f"{self.name}.summary.csv"])
        return out / f"{self.name}.csv"

    def side_by_side(self, res) -> pd.DataFrame:
        """Per head: the LLM's and the rule describer's descriptions with their scores and shuffled controls."""
        llm = res.table.set_index(["layer", "head"])
        rules = res.rules.set_index(["layer", "head"])
        sc = {d: g.set_index(["layer", "head"]) for d, g in self.scores.groupby("describer")}
        out = []
        for (la, h), r in llm.iterrows():
            out.append({"layer": la, "head": h, "quartile": r.quartile, "salient": str(r.salient_tokens)[:60],
                        "llm": r.pattern if r.has_pattern else ("Unclear" if r.status == "ok" else f"({r.parse})"),
                        "llm_score": sc["llm"].score.get((la, h)), "llm_control": sc["llm"].control_score.get((la, h)),
                        "rules": rules.pattern.get((la, h)), "rules_score": sc["rules"].score.get((la, h)),
                        "rules_control": sc["rules"].control_score.get((la, h))})
        return pd.DataFrame(out)

    def clearest(self, res, n: int = 3) -> list[str]:
        """Text blocks for the ``n`` best-scoring verified heads of each describer: the description, its score and
        the held-out evidence it was judged on (the head's own rows marked ``+``)."""
        blocks = []
        for d, g in self.scores.groupby("describer", sort=False):
            top = g[g.score >= self.threshold].sort_values(["score", "layer"], ascending=[False, False]).head(n)
            for r in top.itertuples():
                desc = (res.table if d == "llm" else res.rules).set_index(["layer", "head"]).loc[(r.layer, r.head)]
                ev = res.evidence[(res.evidence.layer == r.layer) & (res.evidence["head"] == r.head)].sort_values("rank")
                lines = [f"{show_token(t)!s:>16} -> " + ", ".join(show_token(m) for m in ms)
                         for t, ms in zip(ev.token, ev.mappings, strict=True)]
                blocks.append(f"=== head {r.layer}.{r.head}, {d} describer: score {r.score:.2f} (control "
                              f"{r.control_score:.2f})\n  description: {desc.pattern}\n  held-out evidence (+):\n    "
                              + "\n    ".join(lines[:10]))
        return blocks


def read_scores(results_dir: str | Path, model: str, name: str = "detection") -> pd.DataFrame | None:
    """Notebook 04's per-head detection scores (``results/<model>/detection.csv``), or None when it was not run."""
    path = result_folder(results_dir, model, f"{name}.csv")
    return read_table(path, "run notebook 04 again with score=True") if path.is_file() else None


def for_items(scores: pd.DataFrame, key: pd.DataFrame, *, threshold: float = THRESHOLD) -> pd.DataFrame:
    """The automatic check beside the human-study items: per item (from the study's key), the LLM description's
    detection score, its shuffled control and whether it is verified."""
    llm = scores[scores.describer == "llm"][["layer", "head", "score", "control_score", "judged"]]
    out = key[["item", "layer", "head", "quartile", "describer_outcome"]].merge(llm, on=["layer", "head"], how="left")
    return out.assign(verified=out.score >= threshold).sort_values("item").reset_index(drop=True)


TARGET_RELATIONS = ("copying", "name_copying", "word_first_letter", "country_capital")


def static_target_heads(loaded, relations: Sequence[str] = TARGET_RELATIONS, *, min_score: float = 0.5,
                        run: RunOptions = RunOptions()) -> pd.DataFrame:
    """Heads whose static score (notebook 01's engine, the paper's k, the model's registered representation) is at least
    ``min_score`` on any of ``relations``: one row per head with its best such relation and score."""

    usable = [r for r in relations if r in list_relations()]
    table = static_scores(loaded, usable, run=run).table()
    hits = table[table.score >= min_score].sort_values("score", ascending=False)
    return hits.drop_duplicates(["layer", "head"])[["layer", "head", "relation", "score"]].sort_values(
        ["layer", "head"]).reset_index(drop=True)


def score_descriptions(res, describer=None, *, threshold: float = THRESHOLD, library=None, negatives=None,
                       name: str = "detection", run: RunOptions = RunOptions()) -> DetectionResult:
    """Detection scores of a :class:`~maps_utils.describe.pipeline.DescriptionResult`'s LLM and rule descriptions, judged
    on its held-out evidence (``res.evidence``) against rows of other heads (of ``negatives``, another
    DescriptionResult, when given). The judge is ``describer`` (default: the one that described ``res``).
    Written as ``<results_dir>/<model>/<name>.csv`` (and ``.summary.csv``, ``.manifest.json``); ``run.seed`` seeds
    the negatives and the shuffled controls."""
    arguments = call_arguments(locals(), skip=("res", "describer", "library", "negatives"))
    describer = describer or res.describer

    t0 = time.perf_counter()
    if res.evidence is None or res.evidence.empty:
        raise ValueError("These descriptions kept no held-out evidence; describe with n_evidence > n_salient.")
    library = library or predicate_library(load_all())
    pool = None if negatives is None else pd.concat([negatives.ops, negatives.evidence], ignore_index=True)
    rows = evidence_rows(res.evidence, res.ops, seed=run.seed, negatives=pool)
    scores = pd.concat([score_llm(describer, res.table, rows, seed=run.seed, progress=run.progress),
                        score_rules(res.rules, rows, library, seed=run.seed)], ignore_index=True)
    params = {**arguments, "judge_version": JUDGE_VERSION, "judge": describer.provenance,
              "judge_model_id": describer.model_id, "n_heads": int(len(rows)),
              "positives": "salient ranks n_salient..n_evidence-1", "negatives": "as many rows of other heads"}
    manifest = build_manifest(parameters=params, wall_seconds=time.perf_counter() - t0, model=res.manifest.get("model"))
    out = DetectionResult(res.model, scores, manifest, res.n_layers, threshold, name)
    if run.results_dir is not None:
        out.write(run.results_dir)
    return out
