"""A self-contained HTML atlas of every attention head of a model (no network, no CDN).

The page shows a layer × head grid coloured by one relation's static score, its suppression score, or the head's
relation categories. Clicking a head opens its panel: its scores on every relation, its salient tokens and their
mappings, the key tokens its static QK map prefers, its LLM description and describer, and its role in the causal
experiment where one was run. A search box
answers "which heads map X → Y" (relation pairs a head hits in its top-k, and salient operations) and "which heads
implement relation R" (score ≥ τ), and jumps to a head given as ``L.H``.

:func:`atlas_data` gathers what the results folder holds; :func:`render_atlas` turns it into one HTML string;
:func:`build_atlas` does both from ``results/<model>/`` and writes ``reports/<model>/atlas.html`` atomically.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.deprecation import renamed_arguments
from ..core.io import atomic_write_text
from ..core.store import RunOptions, model_slug, read_table, result_folder
from ..relations import TopK
from ..static.scores import TAU, static_scores
from ..static.tables import category_map


def _r(x: float) -> float:
    return round(float(x), 3)


def atlas_data(static, *, descriptions: pd.DataFrame | None = None, ops: pd.DataFrame | None = None,
               ablation_heads: pd.DataFrame | None = None, ablation_summary: pd.DataFrame | None = None,
               qk_keys: pd.DataFrame | None = None, executable: pd.DataFrame | None = None, tau: float = TAU,
               top_k: TopK | None = None) -> dict:
    """Everything the page shows, as plain JSON-able data.

    ``static`` is a :class:`maps_utils.static.scores.StaticScores`; the others are notebook 04's ``descriptions.csv`` and
    ``descriptions.ops.csv``, notebook 03's ``heads.csv`` and ``summary.csv`` and notebook 06's
    ``qk/salient_keys.csv`` tables and notebook 04's ``descriptions.executable.csv`` (each optional).
    Heads are numbered ``layer * n_heads + head``.
    """
    L, H = (int(x) for x in static.ranks.top.shape[:2])
    table = static.table(top_k=top_k)
    table["category"] = table.category.fillna("uncategorised")  # relation files of one's own may have none
    rels, scores, supp, hits = [], [], [], []
    for rel in static.relations:
        k = rel.k(top_k)
        top, _ = static.ranks_of(rel.name)
        hit = (top.long() < k).reshape(L * H, -1)  # [heads, pairs]
        heads_of_pair = [np.flatnonzero(col).tolist() for col in hit.T.numpy()]
        rels.append({"name": rel.name, "label": rel.display_name or rel.name, "category": rel.category, "k": k,
                     "n": rel.n, "pairs": [list(p) for p in rel.pairs]})
        hits.append([[i, hs] for i, hs in enumerate(heads_of_pair) if hs])
        g = table[table.relation == rel.name].sort_values(["layer", "head"])
        scores.append([_r(x) for x in g.score])
        supp.append([_r(x) for x in g.suppression_score])
    cats = category_map(table, tau).sort_values(["layer", "head"])
    data = {
        "model": static.model, "variant": static.representation, "n_layers": L, "n_heads": H, "tau": tau,
        "relations": rels, "scores": scores, "suppression": supp, "hits": hits,
        "categories": [[lab, list(c)] for lab, c in zip(cats.label, cats.categories, strict=True)],
        "ops": {}, "descriptions": {}, "executable": {}, "ablation": {}, "qk": {}, "sources": {"static": static.representation},
    }
    if qk_keys is not None and len(qk_keys):
        for (la, h), g in qk_keys.sort_values("rank").groupby(["layer", "head"]):
            data["qk"][str(int(la) * H + int(h))] = [[str(t), _r(a)] for t, a in zip(g.token, g.attraction,
                                                                                    strict=True)]
        data["sources"]["qk"] = True
    if ops is not None and len(ops):
        for (la, h), g in ops.sort_values("rank").groupby(["layer", "head"]):
            maps = g.mappings.map(lambda m: json.loads(m) if isinstance(m, str) else list(m))
            data["ops"][str(int(la) * H + int(h))] = [[t, m, _r(s)] for t, m, s in zip(g.token, maps, g.saliency,
                                                                                      strict=True)]
        data["sources"]["salient_operations"] = True
    if descriptions is not None and len(descriptions):
        for r in descriptions.itertuples():
            data["descriptions"][str(int(r.layer) * H + int(r.head))] = {
                "pattern": str(r.pattern), "inputs": str(r.inputs), "parse": str(r.parse), "status": str(r.status),
                "has_pattern": str(r.has_pattern).lower() == "true", "describer": str(r.describer),
                "raw": str(r.raw)[:600]}
        data["sources"]["descriptions"] = sorted(set(descriptions.describer.astype(str)))
    if executable is not None and len(executable):
        for r in executable.itertuples():
            data["executable"][str(int(r.layer) * H + int(r.head))] = {
                "sentence": str(r.sentence), "clauses": str(r.clauses), "score": _r(r.score),
                "control": None if str(r.control_score) in ("", "nan") else _r(r.control_score),
                "verified": str(r.verified).lower() == "true"}
        data["sources"]["executable"] = True
    if ablation_heads is not None and len(ablation_heads):
        change = {} if ablation_summary is None else dict(zip(ablation_summary.relation, ablation_summary.tr_change_pct,
                                                              strict=True))
        removed = {} if ablation_summary is None else dict(zip(ablation_summary.relation, ablation_summary.heads_removed,
                                                               strict=True))
        for r in ablation_heads.itertuples():
            c = change.get(r.relation)
            data["ablation"].setdefault(str(int(r.layer) * H + int(r.head)), []).append(
                [r.relation, int(r.rank), None if c is None or pd.isna(c) else _r(c), removed.get(r.relation)])
        data["sources"]["ablation"] = True
    return data


def render_atlas(data: dict) -> str:
    """One self-contained HTML page (inline CSS, JS and data) for :func:`atlas_data`'s output."""
    payload = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    title = f"MAPS head atlas: {html.escape(str(data['model']))}"
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", payload)


@renamed_arguments(variant="representation")
def build_atlas(loaded, results_dir: str | Path = "results", out: str | Path | None = None,
                representation: str | None = None) -> Path:
    """Read ``results/<model>/`` (static scores under ``representation``, default the model's registered one, computed
    if missing; descriptions; ablation) and write the atlas to ``out`` (default ``reports/<model>/atlas.html``)."""

    res = result_folder(results_dir, loaded.name)
    static = static_scores(loaded, representation=representation or loaded.representation,
                           run=RunOptions(results_dir=results_dir))

    def read(path: Path, notebook: str = "04_salient_descriptions") -> pd.DataFrame | None:
        rebuild = f"run notebooks/{notebook}.ipynb again (`make all` runs it)"
        return read_table(path, rebuild, keep_default_na=False) if path.is_file() else None

    abl = res / "ablation" / "zero"
    data = atlas_data(static, descriptions=read(res / "descriptions.csv"), ops=read(res / "descriptions.ops.csv"),
                      ablation_heads=read(abl / "heads.csv", "03_ablation"),
                      ablation_summary=read(abl / "summary.csv", "03_ablation"),
                      qk_keys=read(res / "qk" / "salient_keys.csv", "06_qk_map"),
                      executable=read(res / "descriptions.executable.csv"))
    out = Path(out) if out is not None else Path("reports") / model_slug(loaded.name) / "atlas.html"
    return atomic_write_text(out, render_atlas(data))


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:12px;color:#222}
h1{font-size:18px;margin:0 0 8px}
#controls{display:flex;gap:10px;flex-wrap:wrap;align-items:center;margin-bottom:8px}
#grid{display:grid;gap:1px;background:#ddd;width:max-content;border:1px solid #ccc}
.cell{width:16px;height:16px;cursor:pointer}
.cell.sel{outline:2px solid #d62728;outline-offset:-2px}
.cell.found{outline:2px solid #111;outline-offset:-2px}
.lab{font-size:9px;color:#666;text-align:center;background:#fff;line-height:16px}
#wrap{display:flex;gap:16px;align-items:flex-start}
#panel{max-width:640px;font-size:13px}
#panel table{border-collapse:collapse;font-size:12px}
#panel td,#panel th{padding:1px 6px;border-bottom:1px solid #eee;text-align:left}
pre{background:#f6f6f6;padding:6px;white-space:pre-wrap;font-size:12px}
#results{font-size:13px;margin:6px 0;max-width:900px}
#results a{cursor:pointer;color:#1f77b4;margin-right:8px}
.legend span{display:inline-block;width:12px;height:12px;margin:0 3px 0 8px;vertical-align:middle}
</style></head><body>
<h1>__TITLE__</h1>
<div id="controls">
 <label>colour: <select id="mode"></select></label>
 <label><input type="checkbox" id="supp"> suppression</label>
 <input id="q" size="42" placeholder="search: X -> Y, a relation name, or L.H">
 <button id="go">search</button>
 <span id="legend" class="legend"></span>
</div>
<div id="results"></div>
<div id="wrap"><div id="grid"></div><div id="panel"><p>Click a head.</p></div></div>
<script id="atlas-data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("atlas-data").textContent);
const L = D.n_layers, H = D.n_heads, N = L * H;
const CATS = {"unclassified":"#eeeeee","algorithmic":"#1f77b4","knowledge":"#2ca02c","linguistic":"#ff7f0e",
              "translation":"#9467bd","uncategorised":"#bcbd22","2 categories":"#8c564b","3 categories":"#e377c2","4 categories":"#17becf"};
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const show = s => JSON.stringify(String(s)).slice(1, -1);
const name = i => `${Math.floor(i / H)}.${i % H}`;
function ramp(v) {  // white -> dark blue
  v = Math.max(0, Math.min(1, v || 0));
  const a = [247, 251, 255], b = [8, 48, 107];
  return `rgb(${a.map((x, j) => Math.round(x + (b[j] - x) * v)).join(",")})`;
}
let sel = -1, cells = [];
function buildGrid() {
  const g = $("grid");
  g.style.gridTemplateColumns = `24px repeat(${L}, 16px)`;
  const frag = document.createDocumentFragment();
  for (let h = H - 1; h >= -1; h--) {
    const lab = document.createElement("div"); lab.className = "lab"; lab.textContent = h >= 0 ? h : "";
    frag.appendChild(lab);
    for (let l = 0; l < L; l++) {
      const d = document.createElement("div");
      if (h < 0) { d.className = "lab"; d.textContent = l % 5 === 0 ? l : ""; }
      else { const i = l * H + h; d.className = "cell"; d.dataset.head = name(i); d.title = name(i);
             d.addEventListener("click", () => select(i)); cells[i] = d; }
      frag.appendChild(d);
    }
  }
  g.appendChild(frag);
}
function colour() {
  const m = $("mode").value, s = $("supp").checked;
  if (m === "__category") {
    for (let i = 0; i < N; i++) cells[i].style.background = CATS[D.categories[i][0]] || "#999";
    $("legend").innerHTML = Object.entries(CATS).map(([k, c]) => `<span style="background:${c}"></span>${esc(k)}`).join("");
    return;
  }
  const r = +m, v = (s ? D.suppression : D.scores)[r];
  for (let i = 0; i < N; i++) { cells[i].style.background = ramp(v[i]); cells[i].title = `${name(i)}: ${v[i]}`; }
  $("legend").innerHTML = `<span style="background:${ramp(0)}"></span>0<span style="background:${ramp(1)}"></span>1 ` +
    `(${s ? "suppression " : ""}score of ${esc(D.relations[r].label)}, k=${D.relations[r].k})`;
}
function select(i) {
  if (sel >= 0) cells[sel].classList.remove("sel");
  sel = i; cells[i].classList.add("sel");
  const l = Math.floor(i / H), h = i % H, c = D.categories[i];
  let out = `<h2 id="panel-title">Head ${l}.${h}</h2><p>layer ${l}, head ${h}; categories (score ≥ ${D.tau}): ` +
            `${c[1].length ? esc(c[1].join(", ")) : "none"}</p>`;
  const order = D.relations.map((r, j) => j).sort((a, b) => D.scores[b][i] - D.scores[a][i]);
  out += "<table><tr><th>relation</th><th>score</th><th>suppression</th><th>k</th></tr>" + order.map(j =>
    `<tr><td>${esc(D.relations[j].label)}</td><td>${D.scores[j][i].toFixed(3)}</td>` +
    `<td>${D.suppression[j][i].toFixed(3)}</td><td>${D.relations[j].k}</td></tr>`).join("") + "</table>";
  const ops = D.ops[i];
  out += ops ? "<h3>Salient operations</h3><pre>" + ops.map(o => `${esc(show(o[0]))}: ${o[1].map(x => esc(show(x))).join(", ")}`).join("\n") + "</pre>"
             : "<p><i>No salient operations recorded for this head (notebook 04 describes a sample by default).</i></p>";
  const qk = D.qk[i];
  if (qk) out += "<h3>Where it looks (static QK map)</h3><p><small>key tokens its mean query prefers most, from the " +
    "parameters alone (notebook 06)</small></p><pre id=\"qk-keys\">" + qk.map(k => `${esc(show(k[0]))} ${k[1]}`).join("\n") + "</pre>";
  const d = D.descriptions[i];
  if (d) {
    const text = d.status !== "ok" ? "(failed)" : (d.parse === "unparsed" || d.parse === "no_keys") ? "(no usable answer)" :
                 d.has_pattern ? d.pattern : "Unclear";
    out += `<h3>Description</h3><p id="description">${esc(text)}${d.inputs && d.has_pattern ? " <br><small>inputs: " + esc(d.inputs) + "</small>" : ""}</p>` +
           `<p><small>describer: ${esc(d.describer)}; answer ${esc(d.parse)}</small></p>`;
  }
  const x = (D.executable || {})[i];
  if (x) out += `<h3>Executable description</h3><p id="executable">${esc(x.sentence)}</p>` +
    `<p><small>${x.verified ? "<b>verified</b>" : "not verified"} on held-out salient operations: score ${x.score}` +
    `${x.control === null ? "" : ", shuffled control " + x.control}; clauses ${esc(x.clauses)}</small></p>`;
  const a = D.ablation[i];
  out += a ? "<h3>Causal ablation</h3><ul>" + a.map(x => `<li>relation head #${x[1]} of ${esc(x[0])}` +
             (x[2] === null ? "" : ` (removing its relation heads: ${x[2] > 0 ? "+" : ""}${x[2].toFixed(0)}% accuracy, ${x[3]} heads removed)`) + "</li>").join("") + "</ul>"
           : (D.sources.ablation ? "<p><small>Not among the relation heads of any ablated relation.</small></p>" : "");
  $("panel").innerHTML = out;
}
function norm(s) { return String(s).trim().toLowerCase(); }
function search() {
  const q = $("q").value.trim();
  cells.forEach(c => c.classList.remove("found"));
  if (!q) { $("results").innerHTML = ""; return; }
  let found = [], what = "";
  const hm = q.match(/^(\d+)\.(\d+)$/);
  const arrow = q.split(/\s*(?:->|→|=>)\s*/);
  if (hm) { const i = +hm[1] * H + +hm[2]; if (+hm[1] < L && +hm[2] < H) { select(i); found = [[i, "head"]]; } what = `head ${q}`; }
  else if (arrow.length === 2) {
    const x = norm(arrow[0]), y = norm(arrow[1]), seen = new Map();
    D.relations.forEach((r, j) => D.hits[j].forEach(([p, hs]) => {
      const pr = r.pairs[p];
      if (norm(pr[0]) === x && norm(pr[1]) === y) hs.forEach(i => seen.set(i, `${r.label}: ${pr[0]} → ${pr[1]} in top-${r.k}`));
    }));
    for (const [i, ops] of Object.entries(D.ops)) ops.forEach(o => {
      if (norm(o[0]) === x && o[1].some(m => norm(m) === y) && !seen.has(+i)) seen.set(+i, `salient operation ${show(o[0])} → ${o[1].map(show).join(", ")}`);
    });
    found = [...seen.entries()]; what = `heads mapping ${esc(arrow[0])} → ${esc(arrow[1])}`;
  } else {
    const j = D.relations.findIndex(r => norm(r.name) === norm(q) || norm(r.label) === norm(q));
    if (j >= 0) {
      $("mode").value = String(j); colour();
      found = D.scores[j].map((v, i) => [i, v]).filter(x => x[1] >= D.tau).sort((a, b) => b[1] - a[1])
                        .map(([i, v]) => [i, `score ${v.toFixed(2)}`]);
      what = `heads implementing ${esc(D.relations[j].label)} (score ≥ ${D.tau})`;
    } else { what = `nothing matches "${esc(q)}": try X -> Y, a relation name (${D.relations.map(r => esc(r.name)).join(", ")}), or L.H`; }
  }
  found.forEach(([i]) => cells[i].classList.add("found"));
  $("results").innerHTML = `<b>${what}</b>: ${found.length} head(s) ` +
    found.slice(0, 200).map(([i, why]) => `<a data-head="${name(i)}" title="${esc(why)}" onclick="select(${i})">${name(i)}</a>`).join("");
}
function init() {
  const m = $("mode");
  D.relations.forEach((r, j) => { const o = document.createElement("option"); o.value = j; o.textContent = r.label; m.appendChild(o); });
  const o = document.createElement("option"); o.value = "__category"; o.textContent = "relation categories"; m.appendChild(o);
  const best = D.relations.map((r, j) => j).sort((a, b) => Math.max(...D.scores[b]) - Math.max(...D.scores[a]))[0];
  if (best !== undefined) m.value = String(best);  // start on the relation with the strongest head
  buildGrid(); colour();
  m.addEventListener("change", colour); $("supp").addEventListener("change", colour);
  $("go").addEventListener("click", search);
  $("q").addEventListener("keydown", e => { if (e.key === "Enter") search(); });
  const hash = new URLSearchParams(location.hash.slice(1));  // e.g. atlas.html#head=3.1 or #q=copying
  if (hash.get("q")) { $("q").value = hash.get("q"); search(); }
  if (hash.get("head")) { const [l, h] = hash.get("head").split(".").map(Number); if (l < L && h < H) cells[l * H + h].click(); }
}
init();
</script></body></html>
"""
