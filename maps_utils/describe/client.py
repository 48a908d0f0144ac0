"""The LLM client behind descriptions and their judging: endpoints, a response cache, retries and stop rules.

A :class:`Describer` answers prompts through one of three endpoints, chosen by :func:`resolve_endpoint`:

* OpenAI's API (``gpt-4o`` by default) when ``OPENAI_API_KEY`` is set, through the ``openai`` client;
* any OpenAI-compatible server given by a base URL (vLLM, llama.cpp server, Ollama …), through the same client;
* otherwise a local instruct model run in-process by llama.cpp (:mod:`maps_utils.describe.local_llm`), whose answers are
  decoded under the request's JSON schema, so they always parse.

Every answer is appended to a JSONL cache keyed by a hash of (model, prompt, generation parameters), so reruns
are free, offline and identical. Errors stop the run with one sentence when no retry can help (refused key, unknown
model, no quota, endpoint unreachable, at once when this machine refuses the connection, a server that accepts
connections but never answers, the run's deadline); anything else fails one prompt and the run goes on. Keys and URL
credentials never reach a written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from .endpoints import (  # noqa: F401 (re-exported: the describer's public names)
    OPENAI_MODEL,
    OPENAI_URL,
    SERVER_KEY_ENV,
    DescriberError,
    Endpoint,
    redact,
    resolve_endpoint,
    safe_url,
    url_secrets,
)
from .local_llm import GRAMMAR_VERSION, LocalLLM
from .response_cache import ResponseCache, cache_key

log = logging.getLogger(__name__)

MAX_TOKENS = {"local": 512, "openai": 512, "server": 512}
"""Answer lengths in tokens. Locally the schema caps the strings at 440 characters in all and the grammar allows no
escapes, so an answer always closes within 512 tokens."""
CONCURRENCY = {"local": 1, "openai": 4, "server": 4}
"""Requests in flight at once, by endpoint kind. The local model runs in the calling thread, one prompt at a time."""


class MalformedResponse(ValueError):
    """An endpoint answered, but not with a chat completion (not JSON, HTML, or no choices)."""


def _fatal(err) -> bool:
    """Errors no retry or other prompt can fix: a refused key, no permission, an unknown model, no quota."""
    import openai as o

    if isinstance(err, (o.AuthenticationError, o.PermissionDeniedError, o.NotFoundError)):
        return True
    return isinstance(err, o.RateLimitError) and "insufficient_quota" in f"{getattr(err, 'code', '')} {err}"


def _refused_on_loopback(err, url: str | None) -> bool:
    """A connection to this machine (127.0.0.0/8, localhost, ::1) was refused: nothing listens there, so no retry
    can help."""
    import openai as o

    if not isinstance(err, o.APIConnectionError) or isinstance(err, o.APITimeoutError) or not _loopback(url):
        return False
    cause = err.__cause__
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or type(cause).__name__ == "ConnectError":  # httpx's
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _loopback(url: str | None) -> bool:
    host = urlsplit(url or "").hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _model_ids(text: str) -> list[str] | None:
    """The model ids of a ``/models`` answer, or None when it is not an OpenAI model list."""
    try:
        data = json.loads(text).get("data")
    except (ValueError, AttributeError):
        return None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        return None
    return [m["id"] for m in data]


def _schema_id(schema: dict | None) -> str | None:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:12] if schema else None


# ---- the client ----------------------------------------------------------------------------------------
@dataclass
class Describer:
    """Answers prompts through an endpoint, with a response cache, retries, per-prompt failures and stop rules.

    Args:
        endpoint: from :func:`resolve_endpoint`.
        cache_path: the JSONL response cache.
        temperature, max_tokens: generation parameters (part of the cache key); ``max_tokens`` defaults by
            endpoint kind (:data:`MAX_TOKENS`).
        timeout: seconds per request; max_retries: retries of a transient error (rate limit, 5xx, timeout,
            connection reset) with exponential backoff from ``backoff`` seconds (or the server's Retry-After); a
            connection refused on this machine (127.0.0.0/8, localhost, ::1) is not retried.
        max_consecutive_failures: stop the run after this many prompts in a row cannot reach the endpoint, or
            this many requests in a row time out (a server that accepts connections but never answers).
        deadline: seconds one call of :meth:`complete_all` may take in all; past it the run stops (what was
            answered stays cached).
        concurrency: requests in flight at once (default by endpoint kind, :data:`CONCURRENCY`).
        threads: the local model's generation threads (default ``$MAPS_DESCRIBER_THREADS`` or 1).
    """

    endpoint: Endpoint
    cache_path: str | Path
    temperature: float = 0.0
    max_tokens: int | None = None
    timeout: float = 120.0
    max_retries: int = 4
    backoff: float = 2.0
    max_backoff: float = 60.0
    max_consecutive_failures: int = 3
    deadline: float | None = 7200.0
    concurrency: int | None = None
    threads: int | None = None
    cache_dir: str | Path | None = None
    sleep: object = field(default=time.sleep, repr=False)
    _halt: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _engine: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.cache = ResponseCache(self.cache_path)
        self.max_tokens = int(self.max_tokens or MAX_TOKENS[self.endpoint.kind])
        self.concurrency = int(self.concurrency or CONCURRENCY[self.endpoint.kind])
        if self.concurrency < 1:
            raise ValueError("concurrency must be a positive integer.")
        self._timeouts = 0
        self._lock = threading.Lock()
        if self.endpoint.kind == "local":

            self._engine = LocalLLM(self.endpoint.model, threads=self.threads, cache_dir=self.cache_dir)
            self.concurrency = 1
        elif not self.endpoint.model:  # the cache key and the provenance must name the model: ask the server now
            self.endpoint = replace(self.endpoint, model=self._only_model(self.endpoint.base_url))

    def params(self, schema: dict | None = None, max_tokens: int | None = None, version: int = 1,
               rows: int | None = None) -> dict:
        """Generation parameters as the cache key and the manifest record them. The schema constrains (and so
        enters the key) only for the local model, which also judges ``rows`` rows by yes/no logits; servers are
        sent the prompt alone."""
        p = {"temperature": float(self.temperature), "max_tokens": int(max_tokens or self.max_tokens),
             "prompt_version": version}
        if self.endpoint.kind == "local" and rows:
            p["judge"] = f"yes-no-margins:{rows}"
        elif self.endpoint.kind == "local" and schema:

            p["schema"] = f"{_schema_id(schema)}-g{GRAMMAR_VERSION}"
        return p

    @property
    def model_id(self) -> str:
        """What the cache key names: the local model's pinned hash and engine version, else the model at its URL."""
        if self._engine is not None:
            return f"local:{self._engine.model_id}"
        return f"{self.endpoint.kind}:{self.endpoint.model}@{safe_url(self.endpoint.base_url)}"

    @property
    def provenance(self) -> dict:
        local = self._engine is not None
        return {"describer_kind": self.endpoint.kind, "describer_model": self.endpoint.model,
                "describer_url": "in-process" if local else safe_url(self.endpoint.base_url),
                "describer": self.endpoint.label,
                "describer_engine": f"llama-cpp-python {self._engine.version}, {self._engine.threads} thread(s)"
                if local else "openai client"}

    def key(self, prompt: str, params: dict | None = None) -> str:
        return cache_key(self.model_id, prompt, params or self.params())

    def _secrets(self) -> list[str]:
        return [os.environ.get(self.endpoint.key_env or "", ""), *url_secrets(self.endpoint.base_url)]

    def _redact(self, text: str) -> str:
        return redact(text, *self._secrets())

    # -- one request
    def _api_key(self) -> str:
        return os.environ.get(self.endpoint.key_env or "", "") or "not-needed"

    def _client(self, base_url: str):
        import openai

        return openai.OpenAI(base_url=base_url, api_key=self._api_key(), timeout=self.timeout, max_retries=0)

    def _retry_after(self, err) -> float | None:
        resp = getattr(err, "response", None)
        value = resp.headers.get("retry-after") if resp is not None else None
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def _count_timeout(self, timed_out: bool) -> None:
        with self._lock:
            self._timeouts = self._timeouts + 1 if timed_out else 0
            stop = self._timeouts >= self.max_consecutive_failures
        if stop:
            self._halt.set()
            raise DescriberError(
                f"The describer {self.endpoint.label} accepted the connection but answered none of the last "
                f"{self._timeouts} requests within {self.timeout:g} s; check that the server is working (or raise "
                f"timeout). Answers so far are cached in {self.cache.path}.")

    def _chat(self, client, prompt: str, max_tokens: int) -> dict:
        try:
            r = client.chat.completions.create(model=self.endpoint.model, temperature=self.temperature,
                                               messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
        except ValueError as err:  # the body was not JSON
            raise MalformedResponse(f"the server's answer is not JSON ({err})") from None
        if isinstance(r, (str, bytes)) or not hasattr(r, "choices"):
            snippet = " ".join(str(r).split())[:60]
            raise MalformedResponse(f"the server answered with text, not a chat completion ({snippet!r}); check that "
                                    "base_url ends in /v1 and points at an OpenAI-compatible server")
        if not r.choices or getattr(r.choices[0], "message", None) is None:
            raise MalformedResponse("the server's answer has no choices / message")
        choice = r.choices[0]
        usage = r.usage.model_dump() if getattr(r, "usage", None) is not None else None
        return {"content": choice.message.content or "", "finish_reason": choice.finish_reason,
                "usage": usage, "response_model": getattr(r, "model", None)}

    def _complete(self, client, prompt: str, max_tokens: int) -> tuple[dict, int]:
        """One chat completion with retries; returns (response fields, attempts)."""
        import openai

        transient = (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError)
        for attempt in range(self.max_retries + 1):
            if self._halt.is_set():  # the run stopped (an error elsewhere, or Ctrl-C): no more requests
                raise openai.APIConnectionError(message="the run stopped", request=None)
            try:
                got = self._chat(client, prompt, max_tokens)
                self._count_timeout(False)
                return got, attempt + 1
            except transient as err:
                self._count_timeout(isinstance(err, openai.APITimeoutError))
                if attempt == self.max_retries or _fatal(err) or _refused_on_loopback(err, self.endpoint.base_url):
                    err.maps_attempts = attempt + 1
                    raise
                wait = self._retry_after(err)
                wait = max(0.0, min(self.max_backoff, wait if wait is not None else self.backoff * 2 ** attempt))
                log.info("describer: %s; retry %d in %.1f s", type(err).__name__, attempt + 1, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")

    def _ask(self, client, prompt: str, schema: dict | None, max_tokens: int, rows: int | None = None):
        """(answer, attempts, seconds), or (the error, 0, seconds) for a per-prompt failure."""
        import openai

        t0 = time.perf_counter()
        try:
            if self._engine is not None and rows:
                return self._engine.judge(prompt, rows), 1, time.perf_counter() - t0
            if self._engine is not None:
                return self._engine.complete(prompt, schema=schema, max_tokens=max_tokens), 1, time.perf_counter() - t0
            return (*self._complete(client, prompt, max_tokens), time.perf_counter() - t0)
        except (openai.APIError, MalformedResponse) as err:
            return err, 0, time.perf_counter() - t0
        except ValueError as err:  # llama.cpp: the prompt does not fit the context, …
            return MalformedResponse(f"the local model could not answer ({err})"), 0, time.perf_counter() - t0

    # -- many requests
    def complete_all(self, prompts: dict, *, schema: dict | None = None, max_tokens: int | None = None,
                     version: int = 1, rows: int | None = None, what: str = "describing",
                     progress: bool = True) -> dict:
        """Answer every prompt (``{id: prompt}``); returns ``{id: row}`` in the prompts' order, each row with
        key, cached, status ("ok" | "failed"), error, raw, finish_reason, attempts and seconds.

        ``rows``: the prompts ask a judge about that many numbered rows; the local model then answers each by
        its yes/no logits (:meth:`~maps_utils.describe.local_llm.LocalLLM.judge`) instead of generating.
        Answers are cached as they arrive; a duplicate prompt is asked once; failures are not cached."""
        params = self.params(schema, max_tokens, version, rows)
        max_tokens = params["max_tokens"]
        out: dict = {}
        todo: dict[str, list] = {}
        for ident, prompt in prompts.items():
            key = self.key(prompt, params)
            entry = self.cache.get(key)
            if entry is not None:
                out[ident] = self._answered(key, entry, cached=True)
            else:
                todo.setdefault(key, []).append(ident)
        bar = tqdm(total=len(prompts), initial=len(out), desc=f"{what} ({self.endpoint.kind})", disable=not progress)
        self._halt.clear()
        self._timeouts = 0
        client = self._client(self.endpoint.base_url) if todo and self._engine is None else None
        ask = lambda key: self._ask(client, prompts[todo[key][0]], schema, max_tokens, rows)  # noqa: E731
        try:
            for key, got in self._run(todo, ask):
                self._record(out, key, todo[key], got, params)
                bar.update(len(todo[key]))
        finally:
            bar.close()
        return {i: out[i] for i in prompts if i in out}

    def _run(self, todo: dict, ask):
        """Yield (key, answer) as answers come: in this thread for the local model, else from a thread pool;
        stops at the deadline, and drops queued requests on any error or Ctrl-C."""
        start = time.monotonic()

        def left() -> float | None:
            if self.deadline is None:
                return None
            remaining = self.deadline - (time.monotonic() - start)
            if remaining <= 0:
                raise self._too_long()
            return remaining

        if self.concurrency == 1:
            for key in todo:
                left()
                yield key, ask(key)
            return
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="describer")
        try:
            futures = {pool.submit(ask, key): key for key in todo}
            try:
                for future in as_completed(futures, timeout=left()):
                    yield futures[future], future.result()
            except FuturesTimeout:
                raise self._too_long() from None
        finally:
            self._halt.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _too_long(self) -> DescriberError:
        self._halt.set()
        return DescriberError(f"The describer {self.endpoint.label} did not finish within the deadline of "
                              f"{self.deadline:g} s; answers so far are cached in {self.cache.path}; rerun to go on, "
                              "or raise deadline.")

    def _answered(self, key: str, entry: dict, cached: bool) -> dict:
        return {"key": key, "cached": cached, "status": "ok", "error": "", "raw": entry["content"],
                "finish_reason": entry.get("finish_reason"), "seconds": entry.get("seconds"),
                "attempts": 0 if cached else entry.get("attempts", 0)}

    def _record(self, rows: dict, key: str, idents: list, got: tuple, params: dict) -> None:
        import openai

        answer, attempts, seconds = got
        if isinstance(answer, Exception):
            err = answer
            if _fatal(err):
                raise self._fatal_error(err) from None
            connection = isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError)
            self._failures = getattr(self, "_failures", 0) + 1 if connection else 0
            if self._failures >= self.max_consecutive_failures or _refused_on_loopback(err, self.endpoint.base_url):
                self._failures = 0
                raise self._unreachable(err) from None
            for ident in idents:
                rows[ident] = {"key": key, "cached": False, "status": "failed", "raw": "", "finish_reason": None,
                               "attempts": getattr(err, "maps_attempts", 1), "seconds": seconds,
                               "error": self._redact(f"{type(err).__name__}: {err}")}
            return
        self._failures = 0
        entry = {"key": key, "created": datetime.now(UTC).isoformat(timespec="seconds"), "model_id": self.model_id,
                 "params": params, **self.provenance, **answer, "attempts": attempts, "seconds": round(seconds, 3)}
        self.cache.append(entry)
        for ident in idents:
            rows[ident] = self._answered(key, entry, cached=False)

    # -- errors that stop the run
    def _unreachable(self, err) -> DescriberError:
        fix = {"openai": "check the network and OPENAI_API_KEY, or unset the key to use the local describer",
               "server": "start that server or fix base_url (name describer_model to replay cached answers with the "
                         "server down), or leave base_url empty to use the local describer",
               "local": "see the error above"}[self.endpoint.kind]
        return DescriberError(f"The describer {self.endpoint.label} cannot be reached ({type(err).__name__}: "
                              f"{self._redact(str(err))}); {fix}. Answers so far are cached in {self.cache.path}.")

    def _fatal_error(self, err) -> DescriberError:
        import openai

        detail = self._redact(str(err))
        if isinstance(err, openai.AuthenticationError):
            what = f"refused the API key ({detail}); set a valid {self.endpoint.key_env or 'key'}"
        elif isinstance(err, openai.NotFoundError):
            what = f"does not know the model {self.endpoint.model!r} ({detail}); name one it serves with describer_model"
        elif isinstance(err, openai.PermissionDeniedError):
            what = f"denied access ({detail}); check the key's permissions for {self.endpoint.model!r}"
        else:
            what = f"reports that the account has no quota left ({detail}); add credit or use another describer"
        return DescriberError(f"The describer {self.endpoint.label} {what}. Answers so far are cached in "
                              f"{self.cache.path}.")

    def _only_model(self, base_url: str) -> str:
        """The model to ask a server for when none was named: the only one it lists."""
        import openai

        try:
            text = self._client(base_url).models.with_raw_response.list().text
        except openai.APIError as err:
            raise self._unreachable(err) from None
        listed = _model_ids(text)
        if listed is None:
            said = self._redact(" ".join(text.split())[:60])
            raise DescriberError(f"The server's answer to GET {safe_url(base_url)}/models is not an OpenAI model list "
                                 f"(it said {said!r}); check that base_url points at an OpenAI-compatible server (it "
                                 "usually ends in /v1), or name the model (describer_model=...).")
        if len(listed) != 1:
            raise DescriberError(f"The server at {safe_url(base_url)} serves {len(listed)} models "
                                 f"({', '.join(listed[:5]) or 'none'}); name one with describer_model.")
        return listed[0]

    def close(self) -> None:
        """Free the local model's memory (it is loaded again on the next request)."""
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._engine.close()
