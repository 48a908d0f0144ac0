"""Salient operations -> prompt -> describer -> parsed, cached descriptions.

The end-to-end tests use the real local describer (llama.cpp running the embedded SmolLM2 GGUF in-process, decoding
under the description schema). The error paths use a tiny scripted HTTP server on 127.0.0.1 that answers like an
OpenAI-compatible endpoint (429s, 5xx, slow answers, hangs, HTML, malformed text) through the real ``openai``
client, because a real server cannot be made to fail on cue.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import torch

from maps_utils.core.store import RunOptions
from maps_utils.describe import client as DR
from maps_utils.describe import pipeline as DS
from maps_utils.describe import response_cache as RC
from maps_utils.describe import sampling as SA
from maps_utils.heads import HeadWeights
from maps_utils.models.loading import LoadedModel

from ..conftest import make_tiny, word_tokenizer

SECRET = "sk-test-DoNotLeak-4242424242"
OPENAI_SECRET = "sk-openai-AlsoSecret-1717171717"


# ---- head selection ---------------------------------------------------------------------------------
def test_quartiles_follow_the_papers_bins():
    assert SA.quartile_labels(48) == ["[0,12)", "[12,24)", "[24,36)", "[36,48)"]
    assert SA.quartile_labels(30) == ["[0,8)", "[8,15)", "[15,23)", "[23,30)"]
    assert [SA.layer_quartile(la, 30) for la in (0, 7, 8, 14, 15, 22, 23, 29)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert SA.quartile_labels(2) == ["[0,1)", "(none)", "[1,2)", "(none)"]


def test_stratified_sample_is_even_seeded_and_overridable():
    a = SA.select_heads(30, 9, "sample", n=40, seed=0)
    assert len(a) == len(set(a)) == 40 and a == sorted(a)
    per_q = pd.Series([SA.layer_quartile(la, 30) for la, _ in a]).value_counts().sort_index().tolist()
    assert per_q == [10, 10, 10, 10]
    assert a == SA.select_heads(30, 9, "sample", n=40, seed=0)
    assert a != SA.select_heads(30, 9, "sample", n=40, seed=1)
    b = SA.select_heads(30, 9, 41, seed=0)
    assert len(b) == 41 and len(set(b)) == 41
    assert len(SA.select_heads(30, 9, "all")) == 270
    assert SA.select_heads(30, 9, 1000) == SA.select_heads(30, 9, "all")
    assert SA.select_heads(30, 9, [(3, 1), [0, 2], (3, 1)]) == [(0, 2), (3, 1)]
    assert SA.select_heads(30, 9, "[[3, 1], [0, 2]]") == [(0, 2), (3, 1)]  # as papermill passes a list written as text
    with pytest.raises(ValueError, match="give a list of"):
        SA.select_heads(30, 9, (2, 3))
    # a 2-layer model has two empty quartiles; the sample still has the size asked for
    assert len(SA.select_heads(2, 4, "sample", n=5)) == 5
    with pytest.raises(ValueError, match="must lie in 30 layers x 9 heads"):
        SA.select_heads(30, 9, [(30, 0)])
    with pytest.raises(ValueError, match='use "all", "sample"'):
        SA.select_heads(30, 9, "everything")
    with pytest.raises(ValueError, match="at least one head"):
        SA.select_heads(30, 9, 0)


# ---- prompt and parsing -----------------------------------------------------------------------------
def test_prompt_has_the_papers_parts():
    p = DS.build_prompt(["Tomas", " Donna", "\n"], [["tommi", " Tom", "T", "Thomas", "to"], ["Don", "a", "b", "c", "d"],
                                                  ["\n\n", "x", "y", "z", "w"]])
    assert "Input strings: ['Tomas', ' Donna', '\\\\n']" in p
    assert "\nTomas: tommi,  Tom, T, Thomas, to\n" in p  # one line per mapping, s: t1, ..., t5; spaces kept
    assert "\n\\n: \\n\\n, x, y, z, w\n" in p  # a newline token reads as \n (repr without quotes)
    assert "mapped to a list of 5 output strings" in p
    assert '"Unclear"' in p and "semantic" in p and "textual" in p
    for key in DS.KEYS:
        assert f'"{key}"' in p
    with pytest.raises(ValueError, match="one list of mappings per salient token"):
        DS.build_prompt(["a"], [])


def test_parse_strict_then_first_object_then_raw():
    strict = DS.parse_description('{"Reasoning": "r", "Input strings": "Names.", "Observed pattern": "Name variants."}')
    assert strict == {"parse": "json", "reasoning": "r", "inputs": "Names.", "pattern": "Name variants.", "has_pattern": True}
    fenced = DS.parse_description('Sure!\n```json\n{"reasoning": "r", "input_strings": ["a", "b"], '
                                 '"OBSERVED PATTERN": "Maps a word to its first letter."}\n``` {"other": 1}')
    assert fenced["parse"] == "extracted" and fenced["inputs"] == "a, b" and fenced["has_pattern"]
    unclear = DS.parse_description('{"Reasoning": "none", "Input strings": "Unclear", "Observed pattern": "unclear."}')
    assert unclear["parse"] == "json" and not unclear["has_pattern"]
    assert not DS.parse_description('{"Reasoning": "no pattern key"}')["has_pattern"]
    cut = DS.parse_description('{"Reasoning": "The inputs are", "Input strings": ["water", "ice", "ice", "ice"')
    assert cut["parse"] == "unparsed" and not cut["has_pattern"] and cut["pattern"] == ""
    assert DS.parse_description('[1, 2] and then {"Observed pattern": "x"}')["parse"] == "extracted"
    assert DS.parse_description(None)["parse"] == "unparsed"
    # JSON without any of the keys is not the requested form; extraction skips such objects
    assert DS.parse_description('{"answer": 42}')["parse"] == "no_keys"
    skip = DS.parse_description('{"a": 1} then {"Observed pattern": "Plural forms."}')
    assert skip["parse"] == "extracted" and skip["pattern"] == "Plural forms."
    for none in ("None", "N/A", "No pattern."):
        assert not DS.parse_description(json.dumps({"Observed pattern": none}))["has_pattern"]
    # a "pattern" that says there is none counts as Unclear
    for hedge in ("The output is not clear, it is unclear how", "There is no clear pattern.", "UNCLEAR"):
        assert DS.is_unclear(hedge)
    assert not DS.is_unclear("Maps a word to its first letter.")


def test_cache_survives_a_cut_line_and_keeps_everything(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = RC.ResponseCache(path)
    cache.append({"key": "a", "content": "one"})
    with open(path, "a") as f:
        f.write('{"key": "b", "content": "cut sh')  # an interrupted write
    cache = RC.ResponseCache(path)
    assert len(cache) == 1 and cache.bad_lines == 1
    cache.append({"key": "c", "content": "three"})
    again = RC.ResponseCache(path)
    assert {k: v["content"] for k, v in again.entries.items()} == {"a": "one", "c": "three"}


def test_cache_keeps_answers_with_line_separators_and_survives_a_cut_character(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = RC.ResponseCache(path)
    cache.append({"key": "a", "content": "odd\u2028line\u2029breaks\x85é"})
    assert path.read_bytes().isascii()
    with open(path, "ab") as f:
        f.write('{"key": "b", "content": "caf\u00e9'.encode()[:-1])  # cut inside the UTF-8 of é
    again = RC.ResponseCache(path)
    assert again.get("a")["content"] == "odd\u2028line\u2029breaks\x85é" and again.bad_lines == 1
    again.append({"key": "c", "content": "ok"})
    assert set(RC.ResponseCache(path).entries) == {"a", "c"}


def test_cache_key_depends_on_model_prompt_and_parameters():
    k = RC.cache_key("m", "p", {"temperature": 0.0, "max_tokens": 10})
    assert k == RC.cache_key("m", "p", {"max_tokens": 10, "temperature": 0.0})
    assert len({k, RC.cache_key("m2", "p", {"temperature": 0.0, "max_tokens": 10}),
                RC.cache_key("m", "p2", {"temperature": 0.0, "max_tokens": 10}),
                RC.cache_key("m", "p", {"temperature": 0.0, "max_tokens": 11})}) == 4


def test_redaction_and_safe_urls():
    assert SECRET not in DR.redact(f"Incorrect API key provided: {SECRET}", SECRET)
    assert DR.redact("not-needed here", "x") == "not-needed here"  # short placeholder keys are not redacted
    assert "sk-" not in DR.redact("Incorrect API key provided: sk-abc***********xyz")
    assert DR.safe_url("https://user:pw@example.org:8443/v1?x=1") == "https://example.org:8443/v1"


def test_endpoint_choice(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert DR.resolve_endpoint() == DR.Endpoint("local", "qwen2.5-coder-1.5b")
    assert DR.resolve_endpoint("smollm2-135m") == DR.Endpoint("local", "smollm2-135m")
    server = DR.resolve_endpoint(base_url="http://127.0.0.1:9/v1/")
    assert server.base_url == "http://127.0.0.1:9/v1" and server.key_env == DR.SERVER_KEY_ENV
    assert DR.resolve_endpoint(base_url="https://api.openai.com/v1").key_env == "OPENAI_API_KEY"
    with pytest.raises(DR.DescriberError, match="not one of the local models"):
        DR.resolve_endpoint("gpt-4o")
    with pytest.raises(DR.DescriberError, match="not an http"):
        DR.resolve_endpoint(base_url="localhost:8000")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    ep = DR.resolve_endpoint()
    assert (ep.kind, ep.model, ep.base_url, ep.key_env) == ("openai", "gpt-4o", DR.OPENAI_URL, "OPENAI_API_KEY")
    assert DR.resolve_endpoint("gpt-4o-mini").model == "gpt-4o-mini"
    assert SECRET not in repr(ep) and SECRET not in ep.label


# ---- a scripted OpenAI-compatible server for the error paths -------------------------------------------
class Scripted(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions from a queue of actions; records what it was sent."""

    daemon_threads = True

    def __init__(self, actions):
        self.actions = list(actions)
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.models_answer = None  # (content type, body) to answer GET /v1/models with instead of a model list
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, status, body, headers=()):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.server.models_answer is not None:
            kind, data = self.server.models_answer[0], self.server.models_answer[1].encode()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._send(200, {"object": "list", "data": [{"id": "scripted-model", "object": "model", "owned_by": "t"}]})

    def do_POST(self):
        srv = self.server
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _answer(self, body):
        self.server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
        action = self.server.actions.pop(0) if self.server.actions else ("ok", "{}")
        if action[0] == "judge":  # answer like a judge: the rows whose source is among its outputs
            action = ("ok", json.dumps({"matching_rows": _copy_rows(body["messages"][0]["content"])}))
        if action[0] == "hang":  # accept, never answer (until the test ends)
            time.sleep(action[1])
            return
        if action[0] == "html":
            data = b"<html><body>Welcome to nginx!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if action[0] == "sleep":
            time.sleep(action[1])
            action = ("ok", '{"Observed pattern": "late"}')
        if action[0] == "ok":
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": action[1]}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        elif action[0] == "raw":
            self._send(200, action[1])
        elif action[0] == "status":
            message = action[2] if len(action) > 2 else "scripted error"
            self._send(action[1], {"error": {"message": message, "type": "error", "code": None}},
                       headers=[("Retry-After", "0")] if action[1] == 429 else ())


def _copy_rows(prompt: str) -> list[int]:
    """The numbered rows of a judge prompt whose input reappears among its outputs (a scripted copy judge)."""
    import re

    found = []
    for m in re.finditer(r"^(\d+)\. (.*?): (.*)$", prompt, re.M):
        outs = [o.strip().lower() for o in m.group(3).split(", ")]
        if m.group(2).strip().lower() in outs:
            found.append(int(m.group(1)))
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scripted():
    servers = []

    def make(*actions):
        servers.append(Scripted(actions))
        return servers[-1]

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def _describer(tmp_path, url, **kw):
    sleeps = []
    kw = {"max_retries": 2, "backoff": 0.01, "sleep": sleeps.append, "concurrency": 1, **kw}  # scripted: in order
    d = DR.Describer(DR.Endpoint("server", "scripted-model", url, DR.SERVER_KEY_ENV), tmp_path / "cache.jsonl", **kw)
    return d, sleeps


def test_rate_limit_then_success_is_retried_with_backoff(scripted, tmp_path):
    srv = scripted(("status", 429), ("status", 503), ("ok", '{"Observed pattern": "Copies the input."}'))
    d, sleeps = _describer(tmp_path, srv.url)
    out = DS.describe(d, {"h": "prompt"}, progress=False).iloc[0]
    assert out.status == "ok" and out.attempts == 3 and out.has_pattern and out.pattern == "Copies the input."
    assert sleeps == [0.0, 0.02]  # Retry-After: 0 from the 429, then backoff * 2 for the 503
    assert len(srv.requests) == 3
    assert srv.requests[0]["body"]["temperature"] == 0.0 and srv.requests[0]["body"]["max_tokens"] == 512


def test_timeouts_and_server_errors_fail_one_head_and_the_run_goes_on(scripted, tmp_path):
    srv = scripted(("sleep", 3), ("sleep", 3), ("status", 500), ("status", 500), ("status", 500),
                   ("ok", 'Here you go: {"Observed pattern": "Unclear"} thanks'), ("ok", "not json at all {"))
    d, _ = _describer(tmp_path, srv.url, timeout=0.5, max_retries=1)
    out = DS.describe(d, {"slow": "p1", "broken": "p2", "fine": "p3", "prose": "p4"}, progress=False).set_index("id")
    assert out.loc["slow", "status"] == "failed" and "Timeout" in out.loc["slow", "error"]
    assert out.loc["slow", "attempts"] == 2 and out.loc["broken", "attempts"] == 2
    assert out.loc["broken", "status"] == "failed" and "InternalServerError" in out.loc["broken", "error"]
    assert out.loc["fine", "parse"] == "extracted" and not out.loc["fine", "has_pattern"]
    assert out.loc["prose", "parse"] == "unparsed" and out.loc["prose", "raw"] == "not json at all {"
    # failures are not cached (a rerun retries them); answers are, malformed ones included
    assert {e["content"] for e in RC.ResponseCache(tmp_path / "cache.jsonl").entries.values()} == {
        'Here you go: {"Observed pattern": "Unclear"} thanks', "not json at all {"}
    again = DS.describe(d, {"fine": "p3", "prose": "p4"}, progress=False)
    assert again.cached.all() and len(srv.requests) == 7


def test_malformed_http_answers_fail_one_head(scripted, tmp_path):
    srv = scripted(("raw", "this is not json"), ("raw", '{"choices": []}'), ("raw", '{"unexpected": 1}'),
                   ("ok", '{"Observed pattern": "fine"}'))
    d, _ = _describer(tmp_path, srv.url)
    out = DS.describe(d, {"a": "p1", "b": "p2", "c": "p3", "d": "p4"}, progress=False).set_index("id")
    assert out.status.tolist() == ["failed", "failed", "failed", "ok"]
    assert out.error.str.startswith("MalformedResponse").iloc[:3].all() and (out.attempts.iloc[:3] == 1).all()
    assert len(srv.requests) == 4  # not retried


def test_unreachable_endpoint_stops_with_a_clear_message(tmp_path):
    port = _free_port()  # nothing listens there
    d, _ = _describer(tmp_path, f"http://127.0.0.1:{port}/v1", max_retries=1, max_consecutive_failures=2)
    with pytest.raises(DR.DescriberError, match=r"cannot be reached .*start that server or fix base_url"):
        DS.describe(d, {"a": "p1", "b": "p2", "c": "p3"}, progress=False)
    with pytest.raises(DR.DescriberError, match="cannot be reached"):
        DR.Describer(DR.Endpoint("server", "", f"http://127.0.0.1:{port}/v1"), tmp_path / "c2.jsonl", max_retries=0)


def test_concurrent_requests_overlap_and_rows_keep_the_prompts_order(scripted, tmp_path):
    n = 8
    srv = scripted(*[("sleep", 0.4)] * n)
    d, _ = _describer(tmp_path, srv.url, concurrency=4)
    prompts = {f"h{i}": f"prompt {i}" for i in range(n)}
    prompts["dup"] = "prompt 3"  # the same prompt twice: asked once
    out = DS.describe(d, prompts, progress=False)
    assert out.id.tolist() == list(prompts) and (out.status == "ok").all() and not out.cached.any()
    assert len(srv.requests) == n and srv.max_in_flight >= 2  # requests overlapped at the server
    assert out.set_index("id").loc["dup", "key"] == out.set_index("id").loc["h3", "key"]
    assert len(RC.ResponseCache(tmp_path / "cache.jsonl")) == n
    again = DS.describe(d, prompts, progress=False)
    assert again.cached.all() and len(srv.requests) == n
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        _describer(tmp_path, srv.url, concurrency=-1)
    assert DR.Describer(DR.Endpoint("server", "m", srv.url), tmp_path / "c.jsonl").concurrency == DR.CONCURRENCY["server"]


def test_a_fatal_error_under_concurrency_stops_the_queue(scripted, tmp_path):
    srv = scripted(("status", 404, "The model `nope` does not exist"), *[("sleep", 0.3)] * 20)
    d, _ = _describer(tmp_path, srv.url, concurrency=2)
    with pytest.raises(DR.DescriberError, match="does not know the model"):
        DS.describe(d, {f"h{i}": f"p{i}" for i in range(20)}, progress=False)
    time.sleep(0.8)  # what was in flight finishes; nothing queued is sent
    assert len(srv.requests) <= 3


def test_server_model_is_asked_for_when_not_named(scripted, tmp_path):
    srv = scripted(("ok", '{"Observed pattern": "x"}'))
    d = DR.Describer(DR.Endpoint("server", "", srv.url), tmp_path / "c.jsonl")
    assert d.endpoint.model == "scripted-model" and "scripted-model@" in d.model_id  # in the cache key and provenance
    out = DS.describe(d, {"a": "p"}, progress=False).iloc[0]
    assert out.status == "ok" and out.describer_model == "scripted-model"
    assert srv.requests[0]["body"]["model"] == "scripted-model"


@pytest.mark.parametrize("status,message,match", [
    (404, "The model `nope` does not exist", "does not know the model"),
    (403, "forbidden", "denied access"),
    (429, "You exceeded your current quota (insufficient_quota)", "no quota left"),
])
def test_errors_no_retry_can_fix_stop_the_run_at_once(scripted, tmp_path, status, message, match):
    srv = scripted(("status", status, message), ("ok", "{}"))
    d, sleeps = _describer(tmp_path, srv.url)
    with pytest.raises(DR.DescriberError, match=match):
        DS.describe(d, {"a": "p1", "b": "p2"}, progress=False)
    assert len(srv.requests) == 1 and sleeps == []


def test_failed_heads_still_give_shares_and_examples(scripted, tmp_path):
    loaded = _tiny_loaded()
    srv = scripted(*[("status", 500)] * 8)
    with pytest.raises(DR.DescriberError, match=r"Every one of the 8 heads failed .*InternalServerError"):
        DS.describe_heads(loaded, heads="all", base_url=srv.url, describer_model="scripted-model", n_salient=2, n_mappings=2, max_retries=0,
                          run=RunOptions(results_dir=tmp_path, progress=False))
    table = pd.read_csv(tmp_path / "tiny-llama" / "descriptions.csv")  # written before the run stops
    assert (table.status == "failed").all() and (table.parse == "failed").all() and not table.has_pattern.any()
    srv = scripted(("status", 500), ("ok", '{"Observed pattern": "Copies tokens."}'))
    one = DR.Describer(DR.Endpoint("server", "scripted-model", srv.url), tmp_path / "c2.jsonl", max_retries=0,
                      concurrency=1)
    res = DS.describe_heads(loaded, heads=[(0, 0), (1, 1)], describer=one, n_salient=2, n_mappings=2,
                            run=RunOptions(results_dir=tmp_path / "two", progress=False))
    shares = res.shares()
    assert shares.share_failed.tolist()[0] == 1.0 and shares.share_pattern.tolist()[2] == 1.0
    params = res.manifest["parameters"]  # the manifest keeps the names of 0.1
    assert params["variant"] == "first_mlp_all" and "representation" not in params
    assert params["prompt_variant"] == "paper" and "prompt_style" not in params
    assert res.clearest().pattern.tolist() == ["Copies tokens."]


def _tiny_loaded():
    model = make_tiny("llama-gqa")
    return LoadedModel("tiny-llama", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"), torch.float64,
                       "test", 0.0)


def test_the_key_is_sent_but_never_written(scripted, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)
    monkeypatch.setenv(DR.SERVER_KEY_ENV, SECRET)
    srv = scripted(("ok", '{"Observed pattern": "p"}'), ("status", 500, f"boom for key {SECRET}"),
                   ("status", 500, f"boom for key {SECRET}"), ("status", 500, f"boom for key {SECRET}"),
                   ("ok", '{"Observed pattern": "q"}'), ("ok", '{"Observed pattern": "r"}'))
    res = DS.describe_heads(_tiny_loaded(), heads="all", base_url=srv.url, describer_model="scripted-model", n_salient=3, n_mappings=2, max_retries=2, backoff=0.0, concurrency=1,
                            run=RunOptions(results_dir=tmp_path, progress=False))
    assert srv.requests[0]["auth"] == f"Bearer {SECRET}"  # the server's key was used; the OpenAI key went nowhere
    assert all(OPENAI_SECRET not in (r["auth"] or "") for r in srv.requests)
    assert (res.table.status == "failed").sum() == 1 and "[redacted]" in res.table.error.str.cat()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"descriptions.csv", "descriptions.ops.csv", "descriptions.manifest.json",
                                       "descriptions.cache.jsonl"}
    for p in files:
        assert SECRET not in p.read_text(errors="replace"), p
        assert OPENAI_SECRET not in p.read_text(errors="replace"), p
    shown = capsys.readouterr()
    assert SECRET not in shown.out + shown.err + caplog.text
    # a refused key stops the run with a sentence, and the message does not carry the key either
    srv = scripted(("status", 401, f"Incorrect API key provided: {SECRET}"))
    d, _ = _describer(tmp_path, srv.url)
    with pytest.raises(DR.DescriberError, match=f"set a valid {DR.SERVER_KEY_ENV}") as err:
        DS.describe(d, {"a": "p-new"}, progress=False)
    assert SECRET not in str(err.value)


def test_salient_ops_table_on_a_tiny_model(tmp_path, monkeypatch):
    loaded = _tiny_loaded()
    run = RunOptions(results_dir=tmp_path / "res", progress=False)
    ops = DS.salient_ops(loaded, [(0, 1), (1, 3)], n_salient=4, n_mappings=3, run=run)
    assert (tmp_path / "res" / loaded.name / "saliency" / "first_mlp_all.pt").is_file()
    monkeypatch.setattr("maps_utils.describe.pipeline.saliency", None)  # the stored saliency is read, not recomputed
    assert DS.salient_ops(loaded, [(0, 1), (1, 3)], n_salient=4, n_mappings=3, run=run).equals(ops)
    assert len(ops) == 8 and set(ops.quartile) == {0, 2}
    assert all(len(m) == 3 for m in ops.mappings)
    for (_layer, _head), g in ops.groupby(["layer", "head"]):
        assert g.saliency.is_monotonic_decreasing
    prompts = DS.head_prompts(ops)
    assert list(prompts) == [(0, 1), (1, 3)]
    first = ops[(ops.layer == 0) & (ops["head"] == 1)].iloc[0]
    assert f"\n{first.token}: {', '.join(first.mappings)}\n" in prompts[(0, 1)]


# ---- the real local describer (llama.cpp, in-process) --------------------------------------------------
@pytest.fixture(scope="module")
def described(smollm2, model_cache, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path_factory.mktemp("described")
    res = DS.describe_heads(smollm2, heads=[(2, 3), (21, 4)], cache_dir=model_cache, describer_model="smollm2-135m",
                            run=RunOptions(results_dir=out, progress=False))
    return res, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.embedded
def test_end_to_end_with_the_local_model_always_answers_in_the_schema(described):
    res, out = described
    t = res.table
    assert list(zip(t.layer, t["head"], strict=True)) == [(2, 3), (21, 4)]
    assert (t.status == "ok").all() and (~t.cached).all() and (t.finish_reason == "stop").all()
    for raw in t.raw:  # grammar-constrained: strict JSON with exactly the three keys, every time
        assert list(json.loads(raw)) == list(DS.KEYS)
    assert (t.parse == "json").all()
    assert (t.describer_kind == "local").all() and (t.describer_model == "smollm2-135m").all()
    assert len(res.ops) == 30 and len(res.evidence) == 50 and set(res.evidence["rank"]) == set(range(15, 40))
    assert res.shares().n_heads.tolist() == [1, 0, 1, 0] and len(res.rules) == 2
    entries = RC.ResponseCache(out / "smollm2-135m" / "descriptions.cache.jsonl").entries
    assert len(entries) == 2
    for e in entries.values():
        assert e["describer_kind"] == "local" and e["model_id"].startswith("local:smollm2-135m:b179c9523d0e6a0f")
        assert "llama-cpp-python-0.3.36" in e["model_id"] and e["params"]["schema"]
    manifest = json.loads((out / "smollm2-135m" / "descriptions.manifest.json").read_text())
    assert manifest["parameters"]["describer"]["describer_engine"].startswith("llama-cpp-python 0.3.36, 1 thread")
    assert manifest["parameters"]["new_responses"] == 2 and manifest["parameters"]["prompt_variant"] == "hinted"
    for name in ("descriptions.rules.csv", "descriptions.evidence.csv", "descriptions.ops.csv"):
        assert (out / "smollm2-135m" / name).is_file()


@pytest.mark.embedded
def test_cache_replay_with_no_model_is_identical(described, smollm2, model_cache, monkeypatch):
    from maps_utils.describe.local_llm import LocalLLM

    res, out = described

    def no_model(*a, **k):
        raise AssertionError("a cached rerun must not load the model")

    monkeypatch.setattr(LocalLLM, "_model", no_model)
    again = DS.describe_heads(smollm2, heads=[(2, 3), (21, 4)], cache_dir=model_cache, describer_model="smollm2-135m",
                              run=RunOptions(results_dir=out, progress=False))
    assert again.table.cached.all()
    cols = ["layer", "head", "salient_tokens", "raw", "parse", "reasoning", "inputs", "pattern", "has_pattern", "key"]
    pd.testing.assert_frame_equal(again.table[cols], res.table[cols])
    pd.testing.assert_frame_equal(again.rules, res.rules)


# ---- describer robustness -----------------------------------------------------------------------------
def test_a_server_that_accepts_but_never_answers_stops_the_run(scripted, tmp_path):
    srv = scripted(*[("hang", 5)] * 12)
    d, _ = _describer(tmp_path, srv.url, timeout=0.3, max_retries=4, max_consecutive_failures=3)
    with pytest.raises(DR.DescriberError, match=r"accepted the connection but answered none of the last 3 requests"):
        DS.describe(d, {f"h{i}": f"p{i}" for i in range(10)}, progress=False)
    assert len(srv.requests) == 3  # three timed-out attempts, then the run stopped: not 10 heads x 5 attempts


def test_the_deadline_bounds_the_whole_run(scripted, tmp_path):
    srv = scripted(*[("ok", '{"Observed pattern": "x"}')] * 5)
    d, _ = _describer(tmp_path, srv.url, deadline=0.0)
    with pytest.raises(DR.DescriberError, match=r"did not finish within the deadline of 0 s"):
        DS.describe(d, {"a": "p1", "b": "p2"}, progress=False)
    assert srv.requests == []


def test_an_html_answer_fails_one_head_with_one_sentence(scripted, tmp_path):
    srv = scripted(("html",), ("ok", '{"Observed pattern": "Copies."}'))
    d, _ = _describer(tmp_path, srv.url)
    out = DS.describe(d, {"a": "p1", "b": "p2"}, progress=False).set_index("id")
    assert out.status.tolist() == ["failed", "ok"] and out.loc["b", "pattern"] == "Copies."
    assert out.loc["a", "error"].startswith("MalformedResponse: the server answered with text, not a chat completion")
    assert "base_url ends in /v1" in out.loc["a", "error"]


def test_url_credentials_never_reach_written_files(scripted, tmp_path):
    srv = scripted(("status", 500, "bad user bob:hunter2"), ("ok", '{"Observed pattern": "x"}'))
    url = srv.url.replace("http://", "http://bob:hunter2@") + "?api_key=zz9top"
    d = DR.Describer(DR.resolve_endpoint("scripted-model", url), tmp_path / "c.jsonl", max_retries=0, concurrency=1)
    out = DS.describe(d, {"a": "p1", "b": "p2"}, progress=False)
    assert "hunter2" not in out.to_csv() and "zz9top" not in out.to_csv() and "[redacted]" in out.error.iloc[0]
    text = (tmp_path / "c.jsonl").read_text()
    assert "hunter2" not in text and "zz9top" not in text and "bob" not in text


# ---- reliability round 3 (issue 35) --------------------------------------------------------------------
@pytest.mark.parametrize("kind,body", [
    ("text/plain", "Hello from a web server"),
    ("application/json", '{"error": "no such route"}'),
    ("application/json", "[1, 2]"),
    ("application/json", '{"data": [{"name": "m"}]}'),
])
def test_a_models_answer_that_is_no_model_list_gives_one_sentence(scripted, tmp_path, kind, body):
    srv = scripted()
    srv.models_answer = (kind, body)
    with pytest.raises(DR.DescriberError) as err:
        DR.Describer(DR.Endpoint("server", "", srv.url), tmp_path / "c.jsonl")
    msg = str(err.value)
    assert msg.startswith(f"The server's answer to GET {srv.url}/models is not an OpenAI model list")
    assert "OpenAI-compatible server" in msg and "describer_model=" in msg and "\n" not in msg


def test_a_refused_connection_on_this_machine_fails_at_once(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    d, sleeps = _describer(tmp_path, url, max_retries=4, max_consecutive_failures=3)
    sent = []
    chat = d._chat
    d._chat = lambda *a: sent.append(a) or chat(*a)  # the real request, counted
    with pytest.raises(DR.DescriberError, match=r"The describer scripted-model \(http://127\.0\.0\.1:\d+/v1\) cannot be "
                                                r"reached .*start that server or fix base_url"):
        DS.describe(d, {"a": "p1", "b": "p2", "c": "p3"}, progress=False)
    assert len(sent) == 1 and sleeps == []  # one attempt: no retry, no other prompt


def test_a_refused_connection_elsewhere_keeps_its_retries(tmp_path):
    here = f"http://127.0.0.1:{_free_port()}/v1"
    d, _ = _describer(tmp_path, here)
    err, attempts, _ = d._ask(d._client(here), "p", None, 8)  # a real refused connection
    assert attempts == 0 and DR._refused_on_loopback(err, here)
    for url in ("http://localhost:1/v1", "http://[::1]:1/v1", "http://127.1.2.3/v1"):
        assert DR._refused_on_loopback(err, url)
    for url in ("http://192.0.2.1:8000/v1", "https://example.org/v1", None):
        assert not DR._refused_on_loopback(err, url)
    # an endpoint that is not this machine: the same refusal is retried (the client itself asks 127.0.0.1)
    import openai

    far, sleeps = _describer(tmp_path, "http://192.0.2.1:8000/v1", max_retries=2)
    with pytest.raises(openai.APIConnectionError) as refused:
        far._complete(far._client(here), "p", 8)
    assert refused.value.maps_attempts == 3 and len(sleeps) == 2


def test_a_describer_with_no_model_named_reads_well(tmp_path):
    assert DR.Endpoint("server", "", "http://127.0.0.1:9/v1").label == "server at http://127.0.0.1:9/v1 (no model named)"
    assert DR.Endpoint("server", None, "http://127.0.0.1:9/v1").label == "server at http://127.0.0.1:9/v1 (no model named)"
    assert DR.Endpoint("server", "m", "http://u:pw@127.0.0.1:9/v1").label == "m (http://127.0.0.1:9/v1)"
    assert DR.Endpoint("openai", "").label == "OpenAI API (no model named)"
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(DR.DescriberError) as err:
        DR.Describer(DR.Endpoint("server", "", url), tmp_path / "c.jsonl")
    assert str(err.value).startswith(f"The describer server at {url} (no model named) cannot be reached")
