"""Salient operations -> prompt -> OpenAI-compatible describer -> parsed, cached descriptions (MAPS-SPEC §4).

For each selected head, :func:`salient_ops` takes its top ``n_salient`` tokens by norm amplification and the
top ``n_mappings`` targets of each (the static engine, MAPS-SPEC §1.7 and §4.1). :func:`build_prompt` writes
them into a prompt with the paper's design (§4.2). A :class:`Describer` sends it through the ``openai`` client
to one of three endpoints, chosen by :func:`resolve_endpoint`:

* OpenAI's API (``gpt-4o`` by default) when ``OPENAI_API_KEY`` is set;
* any OpenAI-compatible server given by a base URL (vLLM, llama.cpp server, Ollama, ``transformers serve`` …);
* otherwise a local ``transformers serve`` of an embedded model (SmolLM2-135M-Instruct), started on a free port
  on 127.0.0.1 by :class:`LocalServer` only when some prompt is not cached yet, and always stopped.

Every response is appended to a JSONL cache keyed by a hash of (endpoint model, prompt, generation parameters),
so reruns are free, offline and identical. :func:`parse_description` reads the answer strictly as JSON, then
as the first JSON object in the text, else keeps the raw text marked unparsed. The API key is read from the
environment when the client is built and never written anywhere; error messages are redacted before they are
stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .errors import MapsError
from .io import atomic_write_text
from .manifest import build_manifest, write_manifest
from .plots import model_slug

log = logging.getLogger(__name__)

KEYS = ("Reasoning", "Input strings", "Observed pattern")
PROMPT_VERSION = 1
OPENAI_URL = "https://api.openai.com/v1"
OPENAI_MODEL = "gpt-4o"
LOCAL_MODEL = "smollm2-135m"
DEFAULT_SAMPLE = 40  # heads described by default: stratified by layer quartile (the paper described ~135 per model)
# generation settings: greedy, so a rerun of an uncached prompt gives the same answer on the same server.
# The local model answers in a few seconds per 100 tokens on a laptop CPU; its JSON is short when it is JSON at all.
MAX_TOKENS = {"local": 150, "openai": 512, "server": 512}
CONCURRENCY = {"local": 8, "openai": 4, "server": 4}
"""Requests in flight at once, by endpoint kind. The local server batches concurrent requests (continuous
batching); on the 2-core CPU, 8 describer prompts at once took 6.6 s per answer against 10.0 s one at a time."""
SERVER_KEY_ENV = "MAPS_DESCRIBER_API_KEY"  # the key for a base_url server (OPENAI_API_KEY is never sent elsewhere)


class DescriberError(MapsError):
    """The describer cannot be used (no endpoint reachable, bad key, no local server)."""


class MalformedResponse(ValueError):
    """An endpoint answered, but not with a chat completion (not JSON, or no choices)."""


# ---- head selection --------------------------------------------------------------------------------
def layer_quartile(layer: int, n_layers: int) -> int:
    """0–3: the quarter of the depth ``layer`` falls in (bins [0, L/4), [L/4, L/2), … as the paper's charts)."""
    return min(3, 4 * int(layer) // int(n_layers))


def quartile_labels(n_layers: int) -> list[str]:
    """``["[0,8)", "[8,15)", …]``: the layer range of each quartile (by :func:`layer_quartile`); "(none)" for an
    empty quartile of a model with fewer than four layers."""
    members = [[la for la in range(n_layers) if layer_quartile(la, n_layers) == q] for q in range(4)]
    return [f"[{m[0]},{m[-1] + 1})" if m else "(none)" for m in members]


def select_heads(n_layers: int, n_heads: int, heads="sample", *, n: int = DEFAULT_SAMPLE,
                 seed: int = 0) -> list[tuple[int, int]]:
    """The heads to describe, sorted by (layer, head).

    ``heads`` is ``"all"``; ``"sample"`` (``n`` heads stratified by layer quartile: ``n // 4`` from each, the
    remainder to the first quartiles, drawn with ``seed``); an int (a sample of that many); or a list of
    ``(layer, head)`` pairs.
    """
    every = [(la, h) for la in range(n_layers) for h in range(n_heads)]
    if isinstance(heads, str) and heads.strip().startswith("["):  # a list passed as text (papermill -p)
        try:
            heads = json.loads(heads)
        except ValueError:
            raise ValueError(f"heads={heads!r} is not a JSON list of [layer, head] pairs.") from None
    if isinstance(heads, str) and heads == "all":
        return every
    if isinstance(heads, str) and heads != "sample":
        raise ValueError(f'heads={heads!r}: use "all", "sample", a number of heads or a list of (layer, head) pairs.')
    if not isinstance(heads, str) and isinstance(heads, Iterable):
        heads = list(heads)
        if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in heads):
            raise ValueError(f"heads={heads!r}: give a list of (layer, head) pairs, e.g. [[2, 3], [21, 4]].")
        chosen = sorted({(int(la), int(h)) for la, h in heads})
        bad = [p for p in chosen if not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads)]
        if bad or not chosen:
            raise ValueError(f"heads: {bad or 'an empty list'} — every (layer, head) must lie in "
                             f"{n_layers} layers x {n_heads} heads.")
        return chosen
    n = int(heads) if not isinstance(heads, str) else int(n)
    if n < 1:
        raise ValueError(f"heads: a sample needs at least one head (got {n}).")
    if n >= len(every):
        return every
    by_q = [[p for p in every if layer_quartile(p[0], n_layers) == q] for q in range(4)]
    return sorted(stratified_pick(by_q, n, seed))


def stratified_pick(groups: Sequence[Sequence], n: int, seed: int = 0) -> list:
    """``n`` items drawn without replacement, as evenly as possible over ``groups`` (``n // len(groups)`` each,
    the remainder to the first groups); a group with too few items gives what it has and the shortfall goes to
    the others in order. Seeded; the result keeps group order."""
    rng = np.random.default_rng(seed)
    g = len(groups)
    want = [n // g + (1 if q < n % g else 0) for q in range(g)]
    take = [min(w, len(b)) for w, b in zip(want, groups, strict=True)]
    short = n - sum(take)
    for q in range(g):
        extra = min(short, len(groups[q]) - take[q])
        take[q] += extra
        short -= extra
    chosen = []
    for q in range(g):
        idx = rng.choice(len(groups[q]), size=take[q], replace=False)
        chosen += [groups[q][i] for i in idx]
    return chosen


# ---- salient operations and the prompt ----------------------------------------------------------------
def show_token(text: str) -> str:
    """A token as the prompt shows it: its Python repr without the quotes (MAPS-SPEC §4.1), so a leading space
    stays visible and a newline reads ``\\n``."""
    return repr(text)[1:-1]


def salient_ops(loaded, heads: Sequence[tuple[int, int]], *, n_salient: int = 15, n_mappings: int = 5,
                variant: str = "first_mlp_all", progress: bool = True) -> pd.DataFrame:
    """Each head's top ``n_salient`` tokens by norm amplification and their top ``n_mappings`` targets.

    One row per (head, salient token): layer, head, quartile, rank, token_id, token, saliency, mapping_ids,
    mappings. ``variant`` is the source representation; the paper's salient operations apply the first MLP in
    every layer (``"first_mlp_all"``, MAPS-SPEC §4.1).
    """
    from .static import saliency, salient_operations

    if n_salient < 1 or n_mappings < 1:
        raise ValueError(f"n_salient and n_mappings must be >= 1 (got {n_salient}, {n_mappings}).")
    if not heads:
        raise ValueError("salient_ops needs at least one (layer, head).")
    sal = saliency(loaded.heads, variant=variant, progress=progress)
    ops = salient_operations(loaded.heads, loaded.tokenizer, n_tokens=n_salient, n_mappings=n_mappings,
                             variant=variant, heads_subset=list(heads), saliency_scores=sal, progress=progress)
    ops.insert(2, "quartile", [layer_quartile(la, loaded.heads.n_layers) for la in ops.layer])
    return ops


PROMPT = """\
You will see a list of input strings and a list of mappings. Each input string is mapped to a list of {n} \
output strings, written as "input: output1, output2, …". Every string is short: usually a word or a part of a word, \
and a leading space belongs to the string.

Input strings: {inputs}

Mappings:
{mappings}

Describe briefly and simply the input strings and the function that produces the mappings. Look for semantic \
patterns (meaning, topic, category) and for textual patterns (spelling, letters, parts of words). For example, \
the inputs 'water', 'ice', 'freeze' are water-related, and the mapping 'fire': 'f' takes a word to its first \
letter. Give the clearest pattern or patterns you see; if there is no clear pattern, write the single word "Unclear".

Answer only with a valid JSON object with these keys:
{{"Reasoning": "<short reasoning>", "Input strings": "<one sentence, or Unclear>", \
"Observed pattern": "<one sentence, or Unclear>"}}
"""


def build_prompt(tokens: Sequence[str], mappings: Sequence[Sequence[str]]) -> str:
    """The describer prompt for one head: its salient tokens and one line ``s: t1, t2, …`` per token."""
    if len(tokens) != len(mappings) or not tokens:
        raise ValueError("build_prompt needs one list of mappings per salient token, and at least one token.")
    inputs = "[" + ", ".join(repr(show_token(t)) for t in tokens) + "]"
    lines = "\n".join(f"{show_token(t)}: " + ", ".join(show_token(m) for m in ms)
                      for t, ms in zip(tokens, mappings, strict=True))
    return PROMPT.format(n=len(mappings[0]), inputs=inputs, mappings=lines)


def head_prompts(ops: pd.DataFrame) -> dict[tuple[int, int], str]:
    """``{(layer, head): prompt}`` from a :func:`salient_ops` table."""
    return {(int(la), int(h)): build_prompt(list(g.token), list(g.mappings))
            for (la, h), g in ops.sort_values("rank").groupby(["layer", "head"], sort=True)}


# ---- parsing ---------------------------------------------------------------------------------------
def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z]", "", str(key).lower())


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value).strip()


_UNCLEAR = re.compile(r"\bunclear\b|\bnot clear\b|\bno (?:clear|obvious|discernible) pattern\b|^(?:none|n/?a|no pattern)$")


def is_unclear(text: str) -> bool:
    """True for an empty answer, the word "Unclear", or a sentence that says so ("not clear", "no clear pattern").

    Deliberately conservative: a pattern hedged with "unclear" counts as no pattern."""
    t = str(text).strip().strip("\"'.!").strip().lower()
    return not t or bool(_UNCLEAR.search(t))


def parse_description(text: str | None) -> dict:
    """Read a describer answer: strict JSON, else the first JSON object in the text, else raw (``unparsed``).

    Returns ``parse`` ("json" | "extracted" | "no_keys" | "unparsed"), the three fields (keys matched ignoring
    case and punctuation; lists are joined) and ``has_pattern`` (a parsed answer whose observed pattern is not
    Unclear). Extraction takes the first object that has at least one of the keys; a JSON answer without any of
    them is ``no_keys`` (not in the requested form, like ``unparsed``).
    """
    text = text or ""
    wanted = {_norm_key(k) for k in KEYS}

    def has_keys(o) -> bool:
        return isinstance(o, dict) and bool(wanted & {_norm_key(k) for k in o})

    obj, how, keyless = None, "unparsed", False
    with contextlib.suppress(ValueError):
        loaded = json.loads(text.strip())
        if isinstance(loaded, dict):
            obj, how = (loaded, "json") if has_keys(loaded) else (None, "unparsed")
            keyless = obj is None
    if obj is None:
        decoder = json.JSONDecoder()
        for m in re.finditer(r"\{", text):
            try:
                loaded, _ = decoder.raw_decode(text, m.start())
            except ValueError:
                continue
            if has_keys(loaded):
                obj, how = loaded, "extracted"
                break
            keyless = keyless or isinstance(loaded, dict)
    if obj is None and keyless:
        how = "no_keys"
    fields = {k: "" for k in KEYS}
    if obj is not None:
        lookup = {_norm_key(k): v for k, v in obj.items()}
        fields = {k: _text(lookup.get(_norm_key(k))) for k in KEYS}
    pattern = fields["Observed pattern"]
    return {"parse": how, "reasoning": fields["Reasoning"], "inputs": fields["Input strings"],
            "pattern": pattern, "has_pattern": obj is not None and not is_unclear(pattern)}


# ---- endpoints ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """Where descriptions come from. ``kind`` is "openai", "server" (a base URL) or "local"; the key itself is
    never stored, only the name of the environment variable it is read from."""

    kind: str
    model: str
    base_url: str | None = None
    key_env: str | None = None

    @property
    def label(self) -> str:
        where = {"openai": "OpenAI API", "local": "local transformers serve"}.get(self.kind, safe_url(self.base_url))
        return f"{self.model} ({where})"


def safe_url(url: str | None) -> str | None:
    """``url`` without any user:password part."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def resolve_endpoint(model: str | None = None, base_url: str | None = None) -> Endpoint:
    """Pick the describer: a given ``base_url``; else OpenAI when ``OPENAI_API_KEY`` is set (``gpt-4o`` unless
    ``model`` names another); else the local server of an embedded model (``model`` or SmolLM2-135M-Instruct)."""
    if base_url:
        if not re.match(r"^https?://", base_url):
            raise DescriberError(f"base_url={base_url!r} is not an http(s) URL; give one like http://127.0.0.1:8000/v1.")
        url = base_url.rstrip("/")
        # an OpenAI key goes to OpenAI only; any other server gets its own variable
        key_env = "OPENAI_API_KEY" if urlsplit(url).hostname == "api.openai.com" else SERVER_KEY_ENV
        return Endpoint("server", model or "", url, key_env)
    if os.environ.get("OPENAI_API_KEY"):
        return Endpoint("openai", model or OPENAI_MODEL, OPENAI_URL, "OPENAI_API_KEY")
    from .models import EMBEDDED

    name = model or LOCAL_MODEL
    if name not in EMBEDDED:
        raise DescriberError(
            f"No OPENAI_API_KEY and no base_url, so the describer would be a local server of {name!r}, which is not "
            f"an embedded model ({', '.join(EMBEDDED)}). Set OPENAI_API_KEY, pass base_url, or pick an embedded model."
        )
    return Endpoint("local", name)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when the parent dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalServer:
    """``transformers serve`` of a local checkpoint on 127.0.0.1, as a context manager.

    It starts on a free port in its own process group, is health-checked (``/health``), and is stopped on exit,
    errors and Ctrl-C alike (SIGTERM to the group, then SIGKILL); on Linux it also dies with its parent. The
    server runs with the hub offline. ``model`` is the name requests must use (the checkpoint path).
    """

    def __init__(self, checkpoint: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 device: str = "auto", startup_timeout: float = 180.0, log_path: str | Path | None = None):
        self.checkpoint = Path(checkpoint)
        self.host, self.port, self.device = host, port, device
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model(self) -> str:
        return str(self.checkpoint)

    @staticmethod
    def executable() -> str:
        here = Path(sys.executable).parent / "transformers"
        found = str(here) if here.is_file() else shutil.which("transformers")
        if not found:
            raise DescriberError("The local describer needs the `transformers` command with its serving extra; "
                                 "install it with `pip install 'transformers[serving]'` (or run `make setup`).")
        return found

    def start(self) -> LocalServer:
        if not (self.checkpoint / "config.json").is_file():
            raise DescriberError(f"{self.checkpoint} is not a transformers checkpoint (no config.json).")
        exe = self.executable()
        self.port = self.port or free_port(self.host)
        self._tmp = tempfile.TemporaryDirectory(prefix="maps-serve-")
        try:
            env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=self._tmp.name, TOKENIZERS_PARALLELISM="false")
            for name in ("OPENAI_API_KEY", SERVER_KEY_ENV):  # the server has no use for them
                env.pop(name, None)
            log_file = self.log_path or Path(self._tmp.name) / "serve.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = log_file
            self._log = open(log_file, "ab")  # noqa: SIM115 (closed in stop)
            cmd = [exe, "serve", str(self.checkpoint), "--host", self.host, "--port", str(self.port),
                   "--device", self.device, "--continuous-batching"]  # concurrent requests decode as one batch
            log.info("starting local describer: %s", " ".join(cmd))
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DescriberError(f"The local describer server exited during start-up (code {self.proc.returncode}); "
                                     f"its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise DescriberError(f"The local describer server did not answer {url} within {self.startup_timeout:.0f} s; "
                             f"its log ends:\n{self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self._log_file.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the server's process group, up to 15 s for it to exit, then SIGKILL to whatever is left of
        the group, whatever happens in between (a second Ctrl-C included)."""
        proc = self.proc
        if proc is not None:
            try:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=15)
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None and self.log_path is None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def local_checkpoint(name: str = LOCAL_MODEL, cache_dir: str | Path | None = None) -> Path:
    """The converted checkpoint directory of an embedded model (written once by the loader)."""
    from .models import EMBEDDED, convert_gguf, converted_dir, default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    gguf = EMBEDDED[name].locate_gguf(cache)
    target = converted_dir(gguf, cache)
    if not (target / "model.safetensors").is_file():
        convert_gguf(gguf, target)
    return target


# ---- cache -----------------------------------------------------------------------------------------
class ResponseCache:
    """Append-only JSONL of describer responses, one object per line, keyed by ``key``.

    A line cut short by an interrupted run is ignored on reading (and a newline is written before the next
    append), so nothing already written is lost.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.bad_lines = 0
        if self.path.is_file():
            for line in self.path.read_bytes().split(b"\n"):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line.decode("utf-8"))
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                    self.bad_lines += 1

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = False
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        with open(self.path, "a", encoding="ascii") as f:  # ASCII JSON: no character can split a line
            f.write(("\n" if needs_newline else "") + json.dumps(entry, ensure_ascii=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[entry["key"]] = entry


def cache_key(model_id: str, prompt: str, params: dict) -> str:
    return hashlib.sha256(json.dumps({"model": model_id, "prompt": prompt, "params": params},
                                     sort_keys=True).encode()).hexdigest()


_SECRETISH = re.compile(r"(sk-[A-Za-z0-9_*\-]{3,}|Bearer\s+\S+)")


def redact(text: str, secret: str | None = None) -> str:
    """``text`` with ``secret`` and anything that looks like an API key removed."""
    text = str(text)
    if secret and len(secret) >= 8:
        text = text.replace(secret, "[redacted]")
    return _SECRETISH.sub("[redacted]", text)


# ---- the describer -------------------------------------------------------------------------------------
FAILED_FIELDS = {"parse": "failed", "reasoning": "", "inputs": "", "pattern": "", "has_pattern": False}


def openai_errors():
    import openai

    return openai


def _fatal(err) -> bool:
    """Errors no retry or other head can fix: a refused key, no permission, an unknown model, no quota."""
    o = openai_errors()
    if isinstance(err, (o.AuthenticationError, o.PermissionDeniedError, o.NotFoundError)):
        return True
    return isinstance(err, o.RateLimitError) and "insufficient_quota" in f"{getattr(err, 'code', '')} {err}"

@dataclass
class Describer:
    """Describes prompts through the ``openai`` client, with a response cache, retries and per-prompt failures.

    Args:
        endpoint: from :func:`resolve_endpoint`.
        cache_path: the JSONL response cache.
        temperature, max_tokens: generation parameters (part of the cache key); ``max_tokens`` defaults by
            endpoint kind (:data:`MAX_TOKENS`).
        timeout: seconds per request; max_retries: retries of a transient error (rate limit, 5xx, timeout,
            connection reset) with exponential backoff from ``backoff`` seconds (or the server's Retry-After).
        max_consecutive_failures: stop the run (keeping everything cached) after this many prompts in a row fail
            because the endpoint cannot be reached.
        concurrency: requests in flight at once (default by endpoint kind, :data:`CONCURRENCY`); answers are
            cached as they arrive, and rows come back in the prompts' order whatever the order of the answers.
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
    concurrency: int | None = None
    server_device: str = "auto"
    cache_dir: str | Path | None = None
    sleep: object = field(default=time.sleep, repr=False)
    server: LocalServer | None = field(default=None, init=False, repr=False)
    _halt: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def __post_init__(self):
        self.cache = ResponseCache(self.cache_path)
        self.max_tokens = int(self.max_tokens or MAX_TOKENS[self.endpoint.kind])
        self.concurrency = int(self.concurrency or CONCURRENCY[self.endpoint.kind])
        if self.concurrency < 1:
            raise ValueError("concurrency must be a positive integer.")
        self._checkpoint = local_checkpoint(self.endpoint.model, self.cache_dir) if self.endpoint.kind == "local" else None
        if self.endpoint.kind != "local" and not self.endpoint.model:
            # the cache key and the provenance must name the model: ask the server now
            self.endpoint = replace(self.endpoint, model=self._only_model(self.endpoint.base_url))

    @property
    def params(self) -> dict:
        return {"temperature": float(self.temperature), "max_tokens": self.max_tokens, "prompt_version": PROMPT_VERSION}

    @property
    def model_id(self) -> str:
        """What the cache key names: the checkpoint's content-keyed directory name for the local model (the same on
        every machine), else the model name at its endpoint."""
        if self.endpoint.kind == "local":
            return f"local:{self.endpoint.model}:{self._checkpoint.name}"
        return f"{self.endpoint.kind}:{self.endpoint.model}@{safe_url(self.endpoint.base_url)}"

    @property
    def provenance(self) -> dict:
        return {"describer_kind": self.endpoint.kind, "describer_model": self.endpoint.model,
                "describer_url": safe_url(self.endpoint.base_url) if self.endpoint.kind != "local" else "127.0.0.1",
                "describer": self.endpoint.label}

    def key(self, prompt: str) -> str:
        return cache_key(self.model_id, prompt, self.params)

    # -- client
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

    def _complete(self, client, model: str, prompt: str) -> tuple[dict, int]:
        """One chat completion with retries; returns (response fields, attempts)."""
        import openai

        transient = (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError)
        for attempt in range(self.max_retries + 1):
            if self._halt.is_set():  # the run stopped (an error elsewhere, or Ctrl-C): no more requests
                raise openai.APIConnectionError(message="the run stopped", request=None)
            try:
                try:
                    r = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}],
                        temperature=self.temperature, max_tokens=self.max_tokens)
                except ValueError as err:  # the body was not JSON
                    raise MalformedResponse(f"the server's answer is not JSON ({err})") from None
                if not r.choices or getattr(r.choices[0], "message", None) is None:
                    raise MalformedResponse("the server's answer has no choices / message")
                choice = r.choices[0]
                usage = r.usage.model_dump() if getattr(r, "usage", None) is not None else None
                return {"content": choice.message.content or "", "finish_reason": choice.finish_reason,
                        "usage": usage, "response_model": getattr(r, "model", None)}, attempt + 1
            except transient as err:
                if attempt == self.max_retries or _fatal(err):
                    err.maps_attempts = attempt + 1
                    raise
                wait = self._retry_after(err)
                wait = max(0.0, min(self.max_backoff, wait if wait is not None else self.backoff * 2 ** attempt))
                log.info("describer: %s; retry %d in %.1f s", type(err).__name__, attempt + 1, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")

    def _unreachable(self, err) -> DescriberError:
        where = self.endpoint.label
        fix = {"openai": "check the network and OPENAI_API_KEY, or unset the key to use the local describer",
               "server": "start that server or fix base_url (name describer_model to replay cached answers with the "
                         "server down), or leave base_url empty to use the local describer",
               "local": "pass base_url / set OPENAI_API_KEY, or see the server's log"}[self.endpoint.kind]
        tail = f"\nThe local server's log ends:\n{self.server.log_tail()}" if self.server is not None else ""
        return DescriberError(f"The describer {where} cannot be reached ({type(err).__name__}: "
                              f"{redact(str(err), self._api_key())}); {fix}. Responses so far are cached in "
                              f"{self.cache.path}.{tail}")

    def describe(self, prompts: dict, *, progress: bool = True) -> pd.DataFrame:
        """Describe every prompt (``{id: prompt}``); returns one row per id with the parsed description, the raw
        answer, status ("ok" | "failed"), error, attempts, seconds, cached and the describer's provenance."""
        import openai

        todo = [i for i, p in prompts.items() if self.key(p) not in self.cache]
        rows: dict = {}
        with contextlib.ExitStack() as stack:
            if todo and self.endpoint.kind == "local":
                self.server = stack.enter_context(LocalServer(self._checkpoint, device=self.server_device))
                stack.callback(setattr, self, "server", None)
            client = model = None
            if todo:
                base = self.server.base_url if self.server else self.endpoint.base_url
                model = self.server.model if self.server else (self.endpoint.model or self._only_model(base))
                client = self._client(base)

            def ask(prompt: str):  # in a worker thread: (answer, attempts, seconds) or the error
                t0 = time.perf_counter()
                try:
                    return (*self._complete(client, model, prompt), time.perf_counter() - t0)
                except (openai.APIError, MalformedResponse) as err:
                    return err, 0, time.perf_counter() - t0

            def answered(ident, key: str, entry: dict, cached: bool) -> None:
                rows[ident] = {"key": key, "cached": cached, "error": "", "status": "ok", "raw": entry["content"],
                               "finish_reason": entry.get("finish_reason"), "seconds": entry.get("seconds"),
                               "attempts": 0 if cached else entry.get("attempts", 0),
                               **parse_description(entry["content"])}

            bar = tqdm(total=len(prompts), desc=f"describing ({self.endpoint.kind})", disable=not progress)
            for ident, prompt in prompts.items():
                key = self.key(prompt)
                entry = self.cache.get(key)
                if entry is not None:
                    answered(ident, key, entry, True)
                    bar.update(1)
            self._halt.clear()
            pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="describer") if todo else None
            try:
                same: dict[str, list] = {}  # one request per distinct prompt
                for i in todo:
                    same.setdefault(self.key(prompts[i]), []).append(i)
                futures = {pool.submit(ask, prompts[ids[0]]): key for key, ids in same.items()} if pool else {}
                consecutive = 0
                for future in as_completed(futures):  # answers are cached as they come
                    key = futures[future]
                    got, attempts, seconds = future.result()
                    bar.update(len(same[key]))
                    if isinstance(got, Exception):
                        err = got
                        if _fatal(err):
                            raise self._fatal_error(err) from None
                        connection = isinstance(err, openai.APIConnectionError) and not isinstance(err, openai.APITimeoutError)
                        consecutive = consecutive + 1 if connection else 0
                        if consecutive >= self.max_consecutive_failures:
                            raise self._unreachable(err) from None
                        for ident in same[key]:
                            rows[ident] = {"key": key, "cached": False, "status": "failed", "raw": "",
                                           "finish_reason": None, "attempts": getattr(err, "maps_attempts", 1),
                                           "error": redact(f"{type(err).__name__}: {err}", self._api_key()),
                                           "seconds": seconds, **FAILED_FIELDS}
                        continue
                    consecutive = 0
                    entry = {"key": key, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                             "model_id": self.model_id, "params": self.params, **self.provenance, **got,
                             "attempts": attempts, "seconds": round(seconds, 3)}
                    self.cache.append(entry)
                    for ident in same[key]:
                        answered(ident, key, entry, False)
            finally:  # on an error or Ctrl-C: drop the queued requests and stop retries; those in flight are dropped
                if pool is not None:
                    self._halt.set()
                    pool.shutdown(wait=False, cancel_futures=True)
                bar.close()
        rows = {i: rows[i] for i in prompts if i in rows}
        out = pd.DataFrame([{"id": i, **r} for i, r in rows.items()])
        for col, value in self.provenance.items():
            out[col] = value
        return out

    def _fatal_error(self, err) -> DescriberError:
        detail = redact(str(err), self._api_key())
        if isinstance(err, openai_errors().AuthenticationError):
            what = f"refused the API key ({detail}); set a valid {self.endpoint.key_env or 'key'}"
        elif isinstance(err, openai_errors().NotFoundError):
            what = f"does not know the model {self.endpoint.model!r} ({detail}); name one it serves with describer_model"
        elif isinstance(err, openai_errors().PermissionDeniedError):
            what = f"denied access ({detail}); check the key's permissions for {self.endpoint.model!r}"
        else:
            what = f"reports that the account has no quota left ({detail}); add credit or use another describer"
        return DescriberError(f"The describer {self.endpoint.label} {what}. Responses so far are cached in "
                              f"{self.cache.path}.")

    def _only_model(self, base_url: str) -> str:
        """The model to ask a server for when none was named: the only one it lists."""
        import openai

        try:
            listed = [m.id for m in self._client(base_url).models.list()]
        except openai.APIError as err:
            raise self._unreachable(err) from None
        if len(listed) != 1:
            raise DescriberError(f"The server at {safe_url(base_url)} serves {len(listed)} models "
                                 f"({', '.join(listed[:5]) or 'none'}); name one with describer_model.")
        return listed[0]


# ---- the whole step ----------------------------------------------------------------------------------
@dataclass
class DescriptionResult:
    """Salient operations (``ops``), one row per head (``table``), and the run's manifest."""

    model: str
    ops: pd.DataFrame
    table: pd.DataFrame
    manifest: dict
    n_layers: int

    def shares(self) -> pd.DataFrame:
        """Per layer quartile: heads, and the share with a described pattern / Unclear / unparsed / failed."""
        return quartile_shares(self.table, self.n_layers)

    def clearest(self, n: int = 5) -> pd.DataFrame:
        """Up to ``n`` heads whose answer was valid JSON with both an input description and a pattern (neither
        Unclear), deepest first; then heads with only a pattern."""
        t = self.table[self.table.has_pattern.fillna(False).astype(bool)].copy()
        t["clarity"] = (t.parse == "json").astype(int) + (~t.inputs.map(is_unclear)).astype(int)
        return t.sort_values(["clarity", "layer", "head"], ascending=[False, False, True]).head(n)

    def write(self, results_dir: str | Path) -> Path:
        out = Path(results_dir) / model_slug(self.model)
        out.mkdir(parents=True, exist_ok=True)
        ops = self.ops.assign(mappings=self.ops.mappings.map(json.dumps), mapping_ids=self.ops.mapping_ids.map(json.dumps))
        atomic_write_text(out / "descriptions.ops.csv", ops.to_csv(index=False))
        atomic_write_text(out / "descriptions.csv", self.table.to_csv(index=False))
        write_manifest(out / "descriptions.manifest.json", self.manifest)
        return out / "descriptions.csv"


OUTCOMES = ("pattern", "unclear", "unparsed", "failed")


def outcome(status: str, parse: str, has_pattern) -> str:
    """One of :data:`OUTCOMES` for a described head: failed request, no usable answer, a pattern, or Unclear."""
    if status != "ok":
        return "failed"
    if parse in ("unparsed", "no_keys", "failed"):
        return "unparsed"
    return "pattern" if str(has_pattern).lower() == "true" else "unclear"


def quartile_table(rows: pd.DataFrame, field: str, categories: Sequence[str], n_layers: int) -> pd.DataFrame:
    """Per layer quartile (index 0-3): ``layers``, the count ``n`` and the share of each value of ``field``."""
    counts = pd.crosstab(rows.quartile, rows[field]).reindex(index=range(4), columns=list(categories), fill_value=0)
    n = counts.sum(axis=1)
    out = counts.div(n.replace(0, np.nan), axis=0)
    out.insert(0, "n", n)
    out.insert(0, "layers", quartile_labels(n_layers))
    return out


def quartile_shares(table: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Per layer quartile: heads described and the share of each :data:`OUTCOMES` (``share_pattern`` …)."""
    t = table.assign(outcome=[outcome(s, p, h) for s, p, h in zip(table.status, table.parse, table.has_pattern,
                                                                  strict=True)])
    q = quartile_table(t, "outcome", OUTCOMES, n_layers)
    out = pd.DataFrame({"quartile": range(4), "layers": q.layers.values, "n_heads": q.n.values})
    for col in OUTCOMES:
        out[f"share_{col}"] = q[col].values
    return out


def describe_heads(loaded, heads="sample", *, n: int = DEFAULT_SAMPLE, seed: int = 0, n_salient: int = 15,
                   n_mappings: int = 5, variant: str = "first_mlp_all", describer: Describer | None = None,
                   describer_model: str | None = None, base_url: str | None = None,
                   results_dir: str | Path | None = "results", progress: bool = True, **describer_kw) -> DescriptionResult:
    """Salient operations of the selected heads, described by an LLM, with a manifest; written under
    ``results/<model>/descriptions.*`` when ``results_dir`` is given. The response cache is
    ``results/<model>/descriptions.cache.jsonl`` (or ``describer.cache_path``)."""
    t0 = time.perf_counter()
    h = loaded.heads
    chosen = select_heads(h.n_layers, h.n_heads, heads, n=n, seed=seed)
    ops = salient_ops(loaded, chosen, n_salient=n_salient, n_mappings=n_mappings, variant=variant, progress=progress)
    prompts = head_prompts(ops)
    if describer is None:
        if results_dir is None and "cache_path" not in describer_kw:
            raise ValueError("describe_heads needs results_dir or a cache_path for the response cache.")
        cache_path = describer_kw.pop("cache_path", None) or Path(results_dir) / model_slug(loaded.name) / "descriptions.cache.jsonl"
        describer = Describer(resolve_endpoint(describer_model, base_url), cache_path, **describer_kw)
    described = describer.describe(prompts, progress=progress)
    first = ops[ops["rank"] == 0].set_index(["layer", "head"])
    tokens = ops.groupby(["layer", "head"]).token.agg(lambda s: ", ".join(show_token(t) for t in s))
    described[["layer", "head"]] = pd.DataFrame(described.id.tolist(), index=described.index)
    table = described.drop(columns="id")
    table.insert(2, "quartile", [layer_quartile(la, h.n_layers) for la in table.layer])
    table.insert(3, "salient_tokens", [tokens[(la, hh)] for la, hh in zip(table.layer, table["head"], strict=True)])
    table.insert(4, "top_saliency", [first.loc[(la, hh), "saliency"] for la, hh in zip(table.layer, table["head"], strict=True)])
    front = ["layer", "head", "quartile", "salient_tokens", "top_saliency", "has_pattern", "pattern", "inputs", "reasoning",
             "parse", "status", "error"]
    table = table[front + [c for c in table.columns if c not in front]]
    wall = time.perf_counter() - t0
    params = {"heads": heads if isinstance(heads, (str, int)) else [list(p) for p in chosen], "n": n, "seed": seed,
              "n_salient": n_salient, "n_mappings": n_mappings, "variant": variant, "n_heads_described": len(chosen),
              **describer.params, "describer": describer.provenance, "model_id": describer.model_id,
              "prompt_version": PROMPT_VERSION, "timeout": describer.timeout, "max_retries": describer.max_retries,
              "concurrency": describer.concurrency,
              "new_responses": int((~table.cached & (table.status == "ok")).sum()), "failed": int((table.status != "ok").sum())}
    manifest = build_manifest(parameters=params, wall_seconds=wall, model=loaded.manifest())
    res = DescriptionResult(str(loaded.name), ops, table, manifest, h.n_layers)
    if results_dir is not None:
        res.write(results_dir)
    return res
