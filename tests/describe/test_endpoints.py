"""Where the describer's answers come from (:mod:`maps_utils.describe.endpoints`): the choice between a server
(``base_url``), OpenAI (``OPENAI_API_KEY``) and the local llama.cpp model; the key of a server read from
``SERVER_KEY_ENV`` and never stored; URLs and text cleared of credentials; and one clear error per bad input.
No server is started and nothing is sent."""

from __future__ import annotations

import os

import pytest

from maps_utils.core.errors import MapsError
from maps_utils.describe import endpoints as EP
from maps_utils.describe.local_llm import DEFAULT_LOCAL_LLM, LOCAL_LLMS

KEY = "sk-test-DoNotLeak-4242424242"
SERVER_SECRET = "srv-key-7f3a9c"  # not key-shaped: only redaction by value can remove it
URL = "https://alice:hunter2pw@llm.example.org:8443/v1?token=qtok123#frag456"


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(EP.SERVER_KEY_ENV, raising=False)


def one_line(err: pytest.ExceptionInfo) -> str:
    assert isinstance(err.value, MapsError)
    text = str(err.value)
    assert "\n" not in text and text.endswith("."), text
    return text


# ---- the choice -----------------------------------------------------------------------------------------
def test_offline_without_a_model_there_is_no_llm_and_resolve_picks_the_default_local_model():
    assert EP.llm_endpoint() is None
    ep = EP.resolve_endpoint()
    assert ep == EP.Endpoint("local", DEFAULT_LOCAL_LLM)
    assert ep.base_url is None and ep.key_env is None
    assert ep.label == f"{DEFAULT_LOCAL_LLM} (local llama.cpp)"


@pytest.mark.parametrize("name", list(LOCAL_LLMS))
def test_naming_a_local_model_offline_picks_it(name):
    assert EP.llm_endpoint(name) == EP.resolve_endpoint(name) == EP.Endpoint("local", name)


def test_an_openai_key_picks_gpt_4o_at_openai_unless_another_model_is_named(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ep = EP.llm_endpoint()
    assert (ep.kind, ep.model, ep.base_url, ep.key_env) == ("openai", EP.OPENAI_MODEL, EP.OPENAI_URL, "OPENAI_API_KEY")
    assert ep.label == "gpt-4o (OpenAI API)"
    assert EP.resolve_endpoint("gpt-4o-mini").model == "gpt-4o-mini"
    assert KEY not in repr(ep) and KEY not in ep.label


def test_a_base_url_wins_over_the_openai_key_and_reads_its_own_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv(EP.SERVER_KEY_ENV, SERVER_SECRET)
    ep = EP.llm_endpoint("my-model", "http://127.0.0.1:8000/v1/")
    assert (ep.kind, ep.model, ep.base_url) == ("server", "my-model", "http://127.0.0.1:8000/v1")
    assert ep.key_env == EP.SERVER_KEY_ENV == "MAPS_DESCRIBER_API_KEY"  # the OpenAI key is never sent elsewhere
    assert os.environ[ep.key_env] == SERVER_SECRET
    assert ep.label == "my-model (http://127.0.0.1:8000/v1)"
    assert not {KEY, SERVER_SECRET} & {ep.model, ep.base_url, ep.key_env}
    assert KEY not in repr(ep) and SERVER_SECRET not in repr(ep)


def test_a_server_without_a_model_is_labelled_as_such():
    ep = EP.resolve_endpoint(base_url="http://127.0.0.1:8000/v1")
    assert ep.model == "" and ep.label == "server at http://127.0.0.1:8000/v1 (no model named)"


def test_a_base_url_at_openai_sends_the_openai_key():
    assert EP.resolve_endpoint(base_url="https://api.openai.com/v1").key_env == "OPENAI_API_KEY"


def test_credentials_in_a_base_url_stay_out_of_the_label():
    ep = EP.resolve_endpoint("m", URL)
    assert ep.label == "m (https://llm.example.org:8443/v1)"
    assert not any(s in ep.label for s in ("alice", "hunter2pw", "qtok123", "frag456"))


# ---- URLs and redaction ----------------------------------------------------------------------------------
def test_safe_url_drops_user_password_query_and_fragment_but_keeps_host_port_and_path():
    assert EP.safe_url(URL) == "https://llm.example.org:8443/v1"
    assert EP.safe_url("http://localhost/v1") == "http://localhost/v1"
    assert EP.safe_url(None) is None and EP.safe_url("") == ""


def test_url_secrets_lists_every_credential_of_a_url():
    found = EP.url_secrets(URL)
    assert {"alice", "hunter2pw", "qtok123", "frag456"} <= set(found)
    assert EP.url_secrets("http://127.0.0.1:8000/v1") == [] and EP.url_secrets(None) == []


def test_a_short_query_value_that_is_no_credential_is_not_redacted_everywhere():
    url = "http://127.0.0.1:8000/v1?api-version=1&api_key=k9"
    found = EP.url_secrets(url)
    assert "1" not in found and "k9" in found  # a credential's name marks it, whatever its length
    text = EP.redact(f"no answer from {EP.safe_url(url)} in 10 s", *found)
    assert text == "no answer from http://127.0.0.1:8000/v1 in 10 s"


def test_an_upper_case_scheme_is_an_http_url():
    assert EP.resolve_endpoint(base_url="HTTPS://llm.example.org/v1").kind == "server"


def test_redact_removes_the_url_credentials_from_an_error_that_quotes_the_url():
    text = EP.redact(f"Connection refused: {URL} (key {SERVER_SECRET})", SERVER_SECRET, *EP.url_secrets(URL))
    assert not any(s in text for s in ("alice", "hunter2pw", "qtok123", "frag456", SERVER_SECRET))
    assert "llm.example.org:8443/v1" in text and "[redacted]" in text


def test_redact_removes_a_longer_secret_whole_even_when_a_shorter_one_is_inside_it():
    text = EP.redact("key=LONGSECRETVALUE end", "SECRET", "LONGSECRETVALUE")
    assert text == "key=[redacted] end"


def test_redact_removes_key_shaped_strings_and_url_userinfo_it_was_not_told_about():
    text = EP.redact(f"Incorrect API key provided: {KEY}; header Bearer abc.def; http://bob:pw9@h/v1")
    assert KEY not in text and "abc.def" not in text and "bob" not in text and "pw9" not in text
    assert text.startswith("Incorrect API key provided: [redacted]") and "http://[redacted]@h/v1" in text


def test_redact_leaves_text_without_secrets_unchanged():
    assert EP.redact("the server answered 503", None, "", "absent") == "the server answered 503"


# ---- bad input: one sentence that names the fix --------------------------------------------------------
@pytest.mark.parametrize("url", ["localhost:8000", "ftp://carol:ftppw@h/v1", "127.0.0.1:8000/v1"])
def test_a_base_url_that_is_not_http_is_one_line_naming_the_fix_and_no_credential(url):
    with pytest.raises(EP.DescriberError) as err:
        EP.resolve_endpoint(base_url=url)
    text = one_line(err)
    assert "not an http(s) URL" in text and "give one like http://127.0.0.1:8000/v1" in text
    assert "carol" not in text and "ftppw" not in text


def test_an_unknown_local_model_offline_is_one_line_naming_the_models_and_the_fixes():
    with pytest.raises(EP.DescriberError) as err:
        EP.llm_endpoint("gpt-4o")
    text = one_line(err)
    assert "'gpt-4o'" in text and all(name in text for name in LOCAL_LLMS)
    assert text.endswith("; set OPENAI_API_KEY, pass base_url, or pick a local model.") and text.count(". ") == 0
