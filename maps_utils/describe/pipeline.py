"""Salient operations -> prompt -> describer (LLM and rules) -> parsed, cached descriptions (MAPS-SPEC §4).

For each selected head, :func:`salient_ops` takes its top tokens by norm amplification and the top
``n_mappings`` targets of each (the static engine, MAPS-SPEC §1.7 and §4.1). The describer sees the first
``n_salient`` (15 in the paper); the next ones, up to ``n_evidence`` (ranks 16-40 by default), are held out as
evidence for scoring the descriptions (:mod:`maps_utils.describe.detection`).

:func:`build_prompt` writes the shown rows into the paper's prompt (§4.2); the ``"hinted"`` style adds counted
hints from the rule describer for weak local models. A :class:`~maps_utils.describe.client.Describer` answers it (GPT-4o,
any OpenAI-compatible server, or a local llama.cpp model decoding under :data:`DESCRIPTION_SCHEMA`), and
:func:`parse_description` reads the answer strictly as JSON, then as the first JSON object in the text, else keeps
the raw text marked unparsed. Beside it, the rule describer (:mod:`maps_utils.describe.rules`) describes every head by the
named predicates that hold for most of its rows.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..core.deprecation import renamed_arguments, renamed_constants
from ..core.hashing import content_key
from ..core.io import atomic_write_text
from ..core.manifest import build_manifest, call_arguments, write_manifest
from ..core.store import RunOptions, Slots, result_folder
from ..relations import load_all
from ..static.salient import saliency, salient_operations
from ..static.sources import default_prefix, parse
from .client import Describer, DescriberError, resolve_endpoint
from .rules import describe_ops, predicate_library, row_holds
from .sampling import DEFAULT_SAMPLE, layer_quartile, quartile_table, select_heads

KEYS = ("Reasoning", "Input strings", "Observed pattern")
PROMPT_VERSION = 1
N_EVIDENCE = 40  # salient tokens computed per head: the describer sees the first n_salient, the rest are evidence
DESCRIPTION_SCHEMA = {
    "type": "object",
    "properties": {"Reasoning": {"type": "string", "maxLength": 160},
                   "Input strings": {"type": "string", "maxLength": 120},
                   "Observed pattern": {"type": "string", "maxLength": 160}},
    "required": list(KEYS),
}
"""The answer's form; the local model decodes under it (string lengths capped so an answer always closes)."""
PROMPT_STYLES = ("paper", "hinted")  # the paper's prompt, or the paper's with counted hints (weak local models)
SALIENCY_VERSION = 1  # the stored saliency tables' format
__getattr__ = renamed_constants(globals(), {"PROMPT_VARIANTS": "PROMPT_STYLES"})  # renamed in 0.2


# ---- salient operations and the prompt ----------------------------------------------------------------
def show_token(text: str) -> str:
    """A token as the prompt shows it: its Python repr without the quotes (MAPS-SPEC §4.1), so a leading space
    stays visible and a newline reads ``\\n``."""
    return repr(text)[1:-1]


@renamed_arguments(variant="representation")
def salient_ops(loaded, heads: Sequence[tuple[int, int]], *, n_salient: int = 15, n_mappings: int = 5,
                representation: str = "first_mlp_all", run: RunOptions = RunOptions(results_dir=None)) -> pd.DataFrame:
    """Each head's top ``n_salient`` tokens by norm amplification and their top ``n_mappings`` targets.

    One row per (head, salient token): layer, head, quartile, rank, token_id, token, saliency, mapping_ids,
    mappings. ``representation`` is the source representation; the paper's salient operations apply the first MLP in
    every layer (``"first_mlp_all"``, MAPS-SPEC §4.1). The whole-vocabulary saliency is kept in the results store
    (``run``; :func:`cached_saliency`).
    """

    if n_salient < 1 or n_mappings < 1:
        raise ValueError(f"n_salient and n_mappings must be >= 1 (got {n_salient}, {n_mappings}).")
    if not heads:
        raise ValueError("salient_ops needs at least one (layer, head).")
    sal = cached_saliency(loaded, representation, run)
    ops = salient_operations(loaded.weights, loaded.tokenizer, n_tokens=n_salient, n_mappings=n_mappings,
                             representation=representation, heads_subset=list(heads), saliency_scores=sal, progress=run.progress)
    ops.insert(2, "quartile", [layer_quartile(la, loaded.weights.n_layers) for la in ops.layer])
    return ops


@renamed_arguments(variant="representation")
def cached_saliency(loaded, representation: str, run: RunOptions):
    """``[n_layers, n_heads, V]`` saliency of every token (:func:`maps_utils.static.salient.saliency`), read from
    ``<results_dir>/<model>/saliency/<representation>.pt`` when it was stored for these weights, dtype and
    representation (and the context-free prefix), else computed and stored. A ``context_free`` saliency runs the model
    once over the whole vocabulary, so keeping it matters. (The cache key spells the representation ``variant``, as
    the saliencies stored before the rename do.)"""

    key = content_key({"engine_version": SALIENCY_VERSION, "weights_sha256": loaded.weights_sha256,
                       "dtype": str(loaded.dtype), "variant": representation,
                       "prefix": None if parse(representation).parameters_only else list(default_prefix(loaded.weights))})
    slots = Slots(run.folder(loaded.name, "saliency"), enabled=run.use_cache)
    sal = slots.read(representation, key)
    if sal is None:
        sal = saliency(loaded.weights, representation=representation, progress=run.progress)
        slots.write(representation, key, sal)
    return sal


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


HINTS = """
Counted hints, computed exactly from the mappings above (use them only where they fit what you see):
{lines}
"""


def rule_hints(tokens: Sequence[str], mappings: Sequence[Sequence[str]], library, *, min_share: float = 0.2,
               max_lines: int = 4) -> str:
    """Lines such as "- in 12 of 15 rows, the head copies the input token (…)" for the rule predicates that hold
    on at least ``min_share`` of the rows (the ``"hinted"`` prompt); "" when none does."""

    rows = list(zip(tokens, mappings, strict=True))
    counts = [(sum(row_holds(p, s, ms) for s, ms in rows), p) for p in library]
    counts = sorted([c for c in counts if c[0] >= max(1, min_share * len(rows))], key=lambda c: -c[0])[:max_lines]
    return "\n".join(f"- in {k} of {len(rows)} rows, the head {p.sentence}" for k, p in counts)


def build_prompt(tokens: Sequence[str], mappings: Sequence[Sequence[str]], hints: str = "") -> str:
    """The describer prompt for one head: its salient tokens and one line ``s: t1, t2, …`` per token; ``hints``
    (from :func:`rule_hints`) go after the mappings when given."""
    if len(tokens) != len(mappings) or not tokens:
        raise ValueError("build_prompt needs one list of mappings per salient token, and at least one token.")
    inputs = "[" + ", ".join(repr(show_token(t)) for t in tokens) + "]"
    lines = "\n".join(f"{show_token(t)}: " + ", ".join(show_token(m) for m in ms)
                      for t, ms in zip(tokens, mappings, strict=True))
    if hints:
        lines += "\n" + HINTS.format(lines=hints).rstrip("\n")
    return PROMPT.format(n=len(mappings[0]), inputs=inputs, mappings=lines)


@renamed_arguments(variant="style")
def head_prompts(ops: pd.DataFrame, style: str = "paper", library=None) -> dict[tuple[int, int], str]:
    """``{(layer, head): prompt}`` from the rows of a :func:`salient_ops` table; ``style`` "paper" (the paper's
    prompt) or "hinted" (with :func:`rule_hints` from ``library``, default every predicate)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style={style!r}: use one of {', '.join(PROMPT_STYLES)}.")
    if style == "hinted" and library is None:

        library = predicate_library(load_all())
    out = {}
    for (la, h), g in ops.sort_values("rank").groupby(["layer", "head"], sort=True):
        tokens, maps = list(g.token), list(g.mappings)
        hints = rule_hints(tokens, maps, library) if style == "hinted" else ""
        out[(int(la), int(h))] = build_prompt(tokens, maps, hints)
    return out


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
# ---- the whole step ----------------------------------------------------------------------------------
@dataclass
class DescriptionResult:
    """Salient operations shown to the describer (``ops``) and held out (``evidence``), one row per head for the
    LLM (``table``) and the rule describer (``rules``), and the run's manifest."""

    model: str
    ops: pd.DataFrame
    table: pd.DataFrame
    manifest: dict
    n_layers: int
    evidence: pd.DataFrame | None = None
    rules: pd.DataFrame | None = None
    describer: Describer | None = None  # not written; the judge of notebook 04 reuses it
    name: str = "descriptions"  # file stem under results/<model>/

    def shares(self) -> pd.DataFrame:
        """Per layer quartile: heads, and the share with a described pattern / Unclear / unparsed / failed."""
        return quartile_shares(self.table, self.n_layers)

    def view(self) -> pd.DataFrame:
        """Per head: salient tokens (cut), the LLM's description (or why there is none) and the rule describer's."""
        rules = self.rules.set_index(["layer", "head"]).pattern if self.rules is not None else {}
        t = self.table
        return pd.DataFrame({
            "layer": t.layer, "head": t["head"], "quartile": t.quartile, "salient": t.salient_tokens.str.slice(0, 60),
            "llm": [verdict(r) for r in t.itertuples()],
            "rules": [rules.get((la, h), "") for la, h in zip(t.layer, t["head"], strict=True)], "parse": t.parse})

    def clearest(self, n: int = 5) -> pd.DataFrame:
        """Up to ``n`` heads whose answer was valid JSON with both an input description and a pattern (neither
        Unclear), deepest first; then heads with only a pattern."""
        t = self.table[self.table.has_pattern.fillna(False).astype(bool)].copy()
        t["clarity"] = (t.parse == "json").astype(int) + (~t.inputs.map(is_unclear)).astype(int)
        return t.sort_values(["clarity", "layer", "head"], ascending=[False, False, True]).head(n)

    def write(self, results_dir: str | Path) -> Path:
        out = result_folder(results_dir, self.model)
        out.mkdir(parents=True, exist_ok=True)
        for name, ops in (("ops", self.ops), ("evidence", self.evidence)):
            if ops is not None:
                ops = ops.assign(mappings=ops.mappings.map(json.dumps), mapping_ids=ops.mapping_ids.map(json.dumps))
                atomic_write_text(out / f"{self.name}.{name}.csv", ops.to_csv(index=False))
        if self.rules is not None:
            atomic_write_text(out / f"{self.name}.rules.csv", self.rules.to_csv(index=False))
        atomic_write_text(out / f"{self.name}.csv", self.table.to_csv(index=False))
        written = [out / f"{self.name}.{n}.csv" for n in ("ops", "evidence", "rules")] + [out / f"{self.name}.csv"]
        write_manifest(out / f"{self.name}.manifest.json", self.manifest, files=[p for p in written if p.is_file()])
        return out / f"{self.name}.csv"


def verdict(r) -> str:
    """A description table row in a few words: the pattern, "Unclear", or why there is no answer."""
    if r.status != "ok":
        return "(failed: " + str(r.error)[:60] + ")"
    if r.parse in ("unparsed", "no_keys"):
        return f"({r.parse}) " + " ".join(str(r.raw).split())[:90]
    return r.pattern if r.has_pattern else "Unclear"


OUTCOMES = ("pattern", "unclear", "unparsed", "failed")


def outcome(status: str, parse: str, has_pattern) -> str:
    """One of :data:`OUTCOMES` for a described head: failed request, no usable answer, a pattern, or Unclear."""
    if status != "ok":
        return "failed"
    if parse in ("unparsed", "no_keys", "failed"):
        return "unparsed"
    return "pattern" if str(has_pattern).lower() == "true" else "unclear"


def quartile_shares(table: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Per layer quartile: heads described and the share of each :data:`OUTCOMES` (``share_pattern`` …)."""
    t = table.assign(outcome=[outcome(s, p, h) for s, p, h in zip(table.status, table.parse, table.has_pattern,
                                                                  strict=True)])
    q = quartile_table(t, "outcome", OUTCOMES, n_layers)
    out = pd.DataFrame({"quartile": range(4), "layers": q.layers.values, "n_heads": q.n.values})
    for col in OUTCOMES:
        out[f"share_{col}"] = q[col].values
    return out


@renamed_arguments(variant="representation", prompt_variant="prompt_style")
def describe_heads(loaded, heads="sample", *, n: int = DEFAULT_SAMPLE, n_salient: int = 15,
                   n_mappings: int = 5, n_evidence: int = N_EVIDENCE, representation: str = "first_mlp_all",
                   prompt_style: str | None = None, describer: Describer | None = None,
                   describer_model: str | None = None, base_url: str | None = None, name: str = "descriptions",
                   run: RunOptions = RunOptions(), **describer_kw) -> DescriptionResult:
    """Salient operations of the selected heads, described by an LLM and by the rule describer, with a manifest;
    written under ``<results_dir>/<model>/<name>.*`` when ``run.results_dir`` is set. The response cache is
    ``<results_dir>/<model>/descriptions.cache.jsonl`` (or ``cache_path``); ``run.seed`` seeds the head sample.

    The describer sees ranks ``< n_salient``; ranks ``n_salient .. n_evidence - 1`` are kept as held-out evidence.
    ``prompt_style`` is "paper" (default for GPT-4o and servers) or "hinted" (default for the local model).
    Raises :class:`~maps_utils.describe.client.DescriberError` (after writing the tables) when every head failed.
    """
    # every argument but the describer's own settings (recorded below from the describer) and a raw base_url,
    # which may carry credentials (the describer's provenance records it redacted)
    # (the manifest keeps the names of 0.1: ``variant`` for the representation, ``prompt_variant`` for the style)
    arguments = call_arguments(locals(), skip=("loaded", "describer", "describer_kw", "base_url"),
                               recorded_as={"representation": "variant", "prompt_style": "prompt_variant"})

    t0 = time.perf_counter()
    w = loaded.weights
    chosen = select_heads(w.n_layers, w.n_heads, heads, n=n, seed=run.seed)
    everything = salient_ops(loaded, chosen, n_salient=max(n_salient, n_evidence), n_mappings=n_mappings,
                             representation=representation, run=run)
    ops = everything[everything["rank"] < n_salient].reset_index(drop=True)
    evidence = everything[everything["rank"] >= n_salient].reset_index(drop=True)
    if describer is None:
        if run.results_dir is None and "cache_path" not in describer_kw:
            raise ValueError("describe_heads needs run.results_dir or a cache_path for the response cache.")
        cache_path = describer_kw.pop("cache_path", None) or run.folder(loaded.name) / "descriptions.cache.jsonl"
        describer = Describer(resolve_endpoint(describer_model, base_url), cache_path, **describer_kw)
    prompt_style = prompt_style or ("hinted" if describer.endpoint.kind == "local" else "paper")
    described = describe(describer, head_prompts(ops, prompt_style), progress=run.progress)
    table = _head_table(described, ops, w.n_layers)
    params = {**arguments, "heads": heads if isinstance(heads, (str, int)) else [list(p) for p in chosen],
              "prompt_variant": prompt_style, "n_heads_described": len(chosen),
              **describer.params(DESCRIPTION_SCHEMA, version=PROMPT_VERSION), "describer": describer.provenance,
              "model_id": describer.model_id, "timeout": describer.timeout, "max_retries": describer.max_retries,
              "deadline": describer.deadline, "concurrency": describer.concurrency,
              "new_responses": int((~table.cached & (table.status == "ok")).sum()), "failed": int((table.status != "ok").sum())}
    manifest = build_manifest(parameters=params, wall_seconds=time.perf_counter() - t0, model=loaded.manifest())
    res = DescriptionResult(str(loaded.name), ops, table, manifest, w.n_layers, evidence, describe_ops(ops), describer,
                            name)
    if run.results_dir is not None:
        res.write(run.results_dir)
    if len(table) and (table.status != "ok").all():
        first = table.error.iloc[0]
        raise DescriberError(f"Every one of the {len(table)} heads failed to get a description (first error: {first}); "
                             f"fix the describer and rerun (answers that did arrive are cached).")
    return res


def describe(describer: Describer, prompts: dict, *, progress: bool = True) -> pd.DataFrame:
    """Describe every prompt (``{id: prompt}``) under :data:`DESCRIPTION_SCHEMA`; one row per id with the parsed
    description, the raw answer, status, error, attempts, seconds, cached and the describer's provenance."""
    got = describer.complete_all(prompts, schema=DESCRIPTION_SCHEMA, version=PROMPT_VERSION, progress=progress)
    rows = [{"id": i, **r, **(parse_description(r["raw"]) if r["status"] == "ok" else FAILED_FIELDS)}
            for i, r in got.items()]
    out = pd.DataFrame(rows)
    for col, value in describer.provenance.items():
        out[col] = value
    return out


FAILED_FIELDS = {"parse": "failed", "reasoning": "", "inputs": "", "pattern": "", "has_pattern": False}


def _head_table(described: pd.DataFrame, ops: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    first = ops[ops["rank"] == 0].set_index(["layer", "head"])
    tokens = ops.groupby(["layer", "head"]).token.agg(lambda s: ", ".join(show_token(t) for t in s))
    described[["layer", "head"]] = pd.DataFrame(described.id.tolist(), index=described.index)
    table = described.drop(columns="id")
    pairs = list(zip(table.layer, table["head"], strict=True))
    table.insert(2, "quartile", [layer_quartile(la, n_layers) for la in table.layer])
    table.insert(3, "salient_tokens", [tokens[p] for p in pairs])
    table.insert(4, "top_saliency", [first.loc[p, "saliency"] for p in pairs])
    front = ["layer", "head", "quartile", "salient_tokens", "top_saliency", "has_pattern", "pattern", "inputs", "reasoning",
             "parse", "status", "error"]
    return table[front + [c for c in table.columns if c not in front]]
