"""Where LLM answers come from: the three endpoints, and keeping their credentials out of everything written.

:func:`resolve_endpoint` picks OpenAI (``OPENAI_API_KEY``), any OpenAI-compatible server (``base_url``) or the local
llama.cpp model; an :class:`Endpoint` stores only the name of the variable its key is read from. :func:`redact`
removes keys (whatever their length), URL credentials and key-like strings from any text before it is stored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from ..core.errors import MapsError
from .local_llm import DEFAULT_LOCAL_LLM, LOCAL_LLMS

OPENAI_URL = "https://api.openai.com/v1"
OPENAI_MODEL = "gpt-4o"
SERVER_KEY_ENV = "MAPS_DESCRIBER_API_KEY"  # the key for a base_url server (OPENAI_API_KEY is never sent elsewhere)


class DescriberError(MapsError):
    """The describer cannot go on (no endpoint reachable, bad key, no answer in time, every prompt failed)."""


@dataclass(frozen=True)
class Endpoint:
    """Where answers come from. ``kind`` is "openai", "server" (a base URL) or "local"; the key itself is never
    stored, only the name of the environment variable it is read from."""

    kind: str
    model: str
    base_url: str | None = None
    key_env: str | None = None

    @property
    def label(self) -> str:
        """``model (where)``, or ``server at URL (no model named)`` before a server is asked for its model."""
        where = {"openai": "OpenAI API", "local": "local llama.cpp"}.get(self.kind, safe_url(self.base_url))
        if not self.model:
            return f"{'server at ' if self.kind == 'server' else ''}{where} (no model named)"
        return f"{self.model} ({where})"


def safe_url(url: str | None) -> str | None:
    """``url`` without any user:password part, query or fragment (where credentials may hide)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_CREDENTIAL_NAME = re.compile(r"key|token|secret|pass|auth|sig|cred", re.I)
OPAQUE_LENGTH = 8  # a query value this long may be a credential whatever its name


def url_secrets(url: str | None) -> list[str]:
    """The credentials inside ``url`` for redaction: user, password, the query and fragment, and each query value
    whose name reads like a credential or that is long enough to be one (``?api-version=1`` keeps its ``1``)."""
    if not url:
        return []
    parts = urlsplit(url)
    found = [parts.username, parts.password, parts.query, parts.fragment]
    for name, _, value in (kv.partition("=") for kv in parts.query.split("&") if kv):
        if _CREDENTIAL_NAME.search(name) or len(value) >= OPAQUE_LENGTH:
            found.append(value)
    return [s for s in found if s]


def resolve_endpoint(model: str | None = None, base_url: str | None = None) -> Endpoint:
    """Pick the describer: a given ``base_url``; else OpenAI when ``OPENAI_API_KEY`` is set (``gpt-4o`` unless
    ``model`` names another); else the local llama.cpp model (``model`` or the default local model)."""

    if base_url:
        if not re.match(r"^https?://", base_url, re.IGNORECASE):
            raise DescriberError(f"base_url={safe_url(base_url)!r} is not an http(s) URL; give one like "
                                 "http://127.0.0.1:8000/v1.")
        url = base_url.rstrip("/")
        key_env = "OPENAI_API_KEY" if urlsplit(url).hostname == "api.openai.com" else SERVER_KEY_ENV
        return Endpoint("server", model or "", url, key_env)
    if os.environ.get("OPENAI_API_KEY"):
        return Endpoint("openai", model or OPENAI_MODEL, OPENAI_URL, "OPENAI_API_KEY")
    name = model or DEFAULT_LOCAL_LLM
    if name not in LOCAL_LLMS:
        raise DescriberError(
            f"No OPENAI_API_KEY and no base_url, so the describer would be the local model {name!r}, which is not one "
            f"of the local models ({', '.join(LOCAL_LLMS)}); set OPENAI_API_KEY, pass base_url, or pick a local model."
        )
    return Endpoint("local", name)



_SECRETISH = re.compile(r"(sk-[A-Za-z0-9_*\-]{3,}|Bearer\s+\S+)")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str, *secrets: str | None) -> str:
    """``text`` without any of ``secrets`` (whatever their length), URL credentials, or key-like strings."""
    text = str(text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    text = _URL_USERINFO.sub("[redacted]@", text)
    return _SECRETISH.sub("[redacted]", text)


def llm_endpoint(model: str | None = None, base_url: str | None = None) -> Endpoint | None:
    """The LLM describer notebook 04 runs beside the executable one: :func:`resolve_endpoint`'s choice, or None
    offline when no model is named (no ``OPENAI_API_KEY``, no ``base_url``, ``model`` None)."""
    if model is None and not base_url and not os.environ.get("OPENAI_API_KEY"):
        return None
    return resolve_endpoint(model, base_url)
