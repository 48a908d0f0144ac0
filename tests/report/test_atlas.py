"""The head atlas: its data against the score tables, a self-contained page, and the page in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from maps_utils import HeadWeights, LoadedModel
from maps_utils.core.store import RunOptions
from maps_utils.qk import study as QS
from maps_utils.report import atlas as ATL
from maps_utils.static import scores as SC

from ..conftest import make_tiny, word_tokenizer


@pytest.fixture
def tiny_static(tmp_path):
    model = make_tiny("llama-gqa").to(torch.float32)
    loaded = LoadedModel("tiny-llama", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"), torch.float32,
                         "test", 0.0)
    rels = []
    for name, pairs in {"same": [[f"t{i}", f"t{i}"] for i in range(40)],
                        "shift": [[f"t{i}", f"t{(i * 7) % 100}"] for i in range(40)]}.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(pairs))
        rels.append(path)
    return loaded, SC.static_scores(loaded, rels, run=RunOptions(results_dir=None, progress=False))


def _fake_tables(H):
    ops = pd.DataFrame([{"layer": 1, "head": 2, "rank": r, "token": f"t{r}", "saliency": 3.0 - r,
                         "mappings": json.dumps([f"t{r + 1}", "t99"])} for r in range(3)])
    desc = pd.DataFrame([{"layer": 1, "head": 2, "pattern": "Maps tN to tN+1.", "inputs": "Tokens.", "parse": "json",
                          "status": "ok", "has_pattern": True, "describer": "tiny-describer (test)", "raw": "{}"}])
    heads = pd.DataFrame([{"relation": "same", "rank": 1, "layer": 0, "head": 3, "score": 0.5}])
    summary = pd.DataFrame([{"relation": "same", "tr_change_pct": -75.0, "heads_removed": 1}])
    return ops, desc, heads, summary


def _executable():
    """Notebook 04's descriptions.executable.csv for head 1.2, as read back with keep_default_na=False."""
    return pd.DataFrame([{"layer": 1, "head": 2, "sentence": "The head writes tN+1 for tN.", "clauses": "successor",
                          "score": 0.92, "control_score": "", "verified": "True"}])


def test_atlas_data_matches_the_score_table(tiny_static):
    loaded, static = tiny_static
    H = loaded.weights.n_heads
    ops, desc, heads, summary = _fake_tables(H)
    keys = QS.salient_keys(loaded, n_tokens=4, run=RunOptions(results_dir=None, progress=False))
    data = ATL.atlas_data(static, descriptions=desc, ops=ops, ablation_heads=heads, ablation_summary=summary,
                         qk_keys=keys)
    table = static.table()
    assert (data["n_layers"], data["n_heads"]) == (2, 4) and [r["name"] for r in data["relations"]] == ["same", "shift"]
    for j, rel in enumerate(data["relations"]):
        g = table[table.relation == rel["name"]].sort_values(["layer", "head"])
        assert data["scores"][j] == pytest.approx(g.score.round(3).tolist(), abs=1e-6)
        assert data["suppression"][j] == pytest.approx(g.suppression_score.round(3).tolist(), abs=1e-6)
        # hits: a head's share of hit pairs is its score
        per_head = np.zeros(8)
        for _, hs in data["hits"][j]:
            per_head[hs] += 1
        assert per_head / rel["n"] == pytest.approx(g.score.to_numpy(), abs=1e-6)
    assert data["ops"]["6"][0] == ["t0", ["t1", "t99"], 3.0]  # head 1.2 = 1 * 4 + 2
    assert data["descriptions"]["6"]["describer"] == "tiny-describer (test)"
    assert data["ablation"]["3"] == [["same", 1, -75.0, 1]]
    head6 = keys[(keys["layer"] == 1) & (keys["head"] == 2)].sort_values("rank")
    assert [k for k, _ in data["qk"]["6"]] == head6.token.tolist() and len(data["qk"]) == 8
    assert [a for _, a in data["qk"]["6"]] == sorted((a for _, a in data["qk"]["6"]), reverse=True)
    page = ATL.render_atlas(data)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loads from the network
    embedded = re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded.replace("<\\/", "</")) == json.loads(json.dumps(data))


def test_script_endings_in_data_cannot_break_the_page(tiny_static):
    _, static = tiny_static
    desc = pd.DataFrame([{"layer": 0, "head": 0, "pattern": "</script><script>alert(1)</script>", "inputs": "",
                          "parse": "json", "status": "ok", "has_pattern": True, "describer": "x", "raw": ""}])
    page = ATL.render_atlas(ATL.atlas_data(static, descriptions=desc))
    assert page.count("</script>") == 2  # the data block's and the code's own


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _dom(path, fragment):
    exe = _chromium()
    assert exe, "no chromium: `make test` installs it (apt-get install chromium); install it to run this test"
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"{path.resolve().as_uri()}#{fragment}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_atlas_in_a_headless_browser(tiny_static, tmp_path):
    loaded, static = tiny_static
    ops, desc, heads, summary = _fake_tables(loaded.weights.n_heads)
    keys = QS.salient_keys(loaded, n_tokens=3, run=RunOptions(results_dir=None, progress=False))
    data = ATL.atlas_data(static, descriptions=desc, ops=ops, ablation_heads=heads, ablation_summary=summary,
                         qk_keys=keys, executable=_executable())
    assert data["executable"]["6"] == {"sentence": "The head writes tN+1 for tN.", "clauses": "successor",
                                       "score": 0.92, "control": None, "verified": True}
    page = tmp_path / "atlas.html"
    page.write_text(ATL.render_atlas(data))
    # the grid renders: one cell per head, coloured
    dom = _dom(page, "")
    assert len(re.findall(r'class="cell[^"]*" data-head="\d+\.\d+"', dom)) == 8
    assert 'style="background: rgb(' in dom
    # clicking a head (a real click event on its cell) opens its panel with scores, operations and description
    dom = _dom(page, "head=1.2")
    assert '<h2 id="panel-title">Head 1.2</h2>' in dom and "Maps tN to tN+1." in dom and "t0: t1, t99" in dom
    assert "tiny-describer (test)" in dom
    assert '<p id="executable">The head writes tN+1 for tN.</p>' in dom and "<b>verified</b>" in dom
    shown = re.search(r'<pre id="qk-keys">(.*?)</pre>', dom, re.S).group(1).splitlines()  # the static QK panel
    assert [line.rsplit(" ", 1)[0] for line in shown] == [k for k, _ in data["qk"]["6"]]
    dom = _dom(page, "head=0.3")
    assert "relation head #1 of same" in dom and "-75% accuracy" in dom
    # search: a pair some heads hit, found exactly; and a relation's heads
    j = 0
    pair_index, expected = data["hits"][j][0]
    s, t = data["relations"][j]["pairs"][pair_index]
    dom = _dom(page, f"q={s} -> {t}")
    found = set(re.findall(r'<a data-head="(\d+\.\d+)"', dom))
    assert found == {f"{i // 4}.{i % 4}" for i in expected}
    dom = _dom(page, "q=t0 -> t1")  # a salient operation of head 1.2
    assert "1.2" in set(re.findall(r'<a data-head="(\d+\.\d+)"', dom))
    best = int(np.argmax(data["scores"][1]))
    dom = _dom(page, "q=shift")
    assert f'data-head="{best // 4}.{best % 4}"' in dom or max(data["scores"][1]) < data["tau"]
    assert "heads implementing shift" in dom


def test_a_1440_head_atlas_renders_and_answers_in_a_headless_browser(tmp_path):
    """The size of the paper's larger models (48 layers x 30 heads): the grid, a click and a search still work."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=60, num_hidden_layers=48, num_attention_heads=30,
                                      num_key_value_heads=30, intermediate_size=64, vocab_size=101,
                                      max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).eval()
    loaded = LoadedModel("tiny-1440", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"), torch.float32,
                         "test", 0.0)
    path = tmp_path / "same.json"
    path.write_text(json.dumps([[f"t{i}", f"t{i}"] for i in range(40)]))
    static = SC.static_scores(loaded, [path], run=RunOptions(results_dir=None, progress=False))
    data = ATL.atlas_data(static)
    page = tmp_path / "atlas.html"
    page.write_text(ATL.render_atlas(data))
    dom = _dom(page, "head=47.29")
    assert len(re.findall(r'class="cell[^"]*" data-head="\d+\.\d+"', dom)) == 48 * 30
    assert '<h2 id="panel-title">Head 47.29</h2>' in dom
    pair_index, expected = data["hits"][0][0]
    s, t = data["relations"][0]["pairs"][pair_index]
    found = set(re.findall(r'<a data-head="(\d+\.\d+)"', _dom(page, f"q={s} -> {t}")))
    assert found == {f"{i // 30}.{i % 30}" for i in expected}


@pytest.mark.embedded
def test_maps_score_and_atlas_commands_on_smollm2(smollm2, tmp_path, capsys):
    from maps_utils.cli import main

    res = str(tmp_path / "res")
    assert main(["score", "smollm2-135m", "--relation", "country_capital", "--results-dir", res, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "country_capital" in out and "top heads" in out and f"written to {res}/" in out
    page = tmp_path / "atlas.html"
    assert main(["atlas", "smollm2-135m", "--results-dir", res, "--out", str(page), "--device", "cpu"]) == 0
    assert f"atlas: {page}" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "res" / "smollm2-135m" / "static" / "first_mlp" / "scores.csv")
    strong = table[(table.relation == "country_capital") & (table.score >= SC.TAU)]  # the atlas scored every relation
    expected = {f"{r.layer}.{r.head}" for r in strong.itertuples()}
    assert expected  # SmolLM2 has country_capital heads (23.4, 23.5, …)
    dom = _dom(page, "q=country_capital")
    assert set(re.findall(r'<a data-head="(\d+\.\d+)"', dom)) == expected
    assert len(re.findall(r'class="cell[^"]*" data-head=', dom)) == 270


def test_qk_keys_with_control_characters_survive_the_csv_and_reach_the_atlas(tiny_static, tmp_path):
    """A key token that decodes to a carriage return or a newline (real vocabularies have them) is written escaped,
    so the table reads back row for row and the atlas builds from it."""
    loaded, static = tiny_static
    odd = LoadedModel("tiny-llama", loaded.model, SimpleNamespace(decode=lambda ids: ["\r", "a\nb", "\t", "x"][ids[0] % 4]),
                      loaded.weights, torch.device("cpu"), torch.float32, "test", 0.0)
    keys = QS.salient_keys(odd, n_tokens=4, run=RunOptions(results_dir=tmp_path, progress=False))
    back = pd.read_csv(tmp_path / "tiny-llama" / "qk" / "salient_keys.csv", keep_default_na=False)
    assert len(back) == len(keys) == 2 * 4 * 4 and set(back.token) <= {"\\r", "a\\nb", "\\t", "x"}
    data = ATL.atlas_data(static, qk_keys=back)
    assert len(data["qk"]) == 8
