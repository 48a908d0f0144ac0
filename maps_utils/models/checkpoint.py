"""A checkpoint's safetensors shards, read one tensor at a time and memory-mapped (nothing is loaded whole).

:class:`Checkpoint` finds the shards of a folder (``model.safetensors.index.json``, one ``model.safetensors``, or
any ``*.safetensors``), checks each opens whole, and gives any tensor by its checkpoint key, zero-copy
(``safe_open(...).get_tensor``: pages are read from disk only when touched). :class:`ModuleTensors` maps the
parameter names of a model built from the checkpoint's config (``model.layers.3.self_attn.v_proj.weight``) to
those tensors, through the names the family's :class:`~maps_utils.heads.spec.ArchSpec` gives where the checkpoint
spells them otherwise. :func:`convert_bin` writes safetensors shards from PyTorch ``.bin`` ones, a shard at a time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..core.errors import MapsError
from ..core.io import atomic_write_text
from ..heads.spec import ArchSpec

INDEX = "model.safetensors.index.json"
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class CheckpointError(MapsError):
    """A checkpoint that cannot be streamed (one sentence naming the fix)."""


def convert_command(folder: Path) -> str:
    return f"maps convert {folder}"


class Checkpoint:
    """The safetensors shards of one checkpoint folder. Each shard's header is read (and the shard checked whole) once;
    a tensor is then read from a mapping of its shard opened for that read, so once the tensor is dropped its pages
    leave the process (a shard kept open would keep every page it ever served resident)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.stored: dict[str, tuple[tuple[int, ...], str]] = {}  # checkpoint key -> (shape, safetensors dtype)
        self.weight_map = self._weight_map()  # checkpoint key -> shard file name
        for shard in sorted(set(self.weight_map.values()) - self._read):
            self._header(shard)  # every shard opens whole, before any work

    def _weight_map(self) -> dict[str, str]:
        self._read: set[str] = set()
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map); download the checkpoint "
                                      "again.") from None
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise CheckpointError(f"Checkpoint {self.folder} lacks shard {missing[0]}"
                                      f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} named by its "
                                      "index; download the missing shard(s) again.")
            return dict(weight_map)
        shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not shards:
            if any(self.folder.glob("*.bin")):
                raise CheckpointError(f"Checkpoint {self.folder} holds only PyTorch .bin weights, and streaming reads "
                                      f"safetensors; convert it once with `{convert_command(self.folder)}`.")
            raise CheckpointError(f"{self.folder} has no safetensors weights to stream; pass a checkpoint folder "
                                  "written by save_pretrained.")
        return {key: shard for shard in shards for key in self._header(shard)}

    def _opened(self, shard: str):
        path = self.folder / shard
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"Shard {path} cannot be read ({str(err).splitlines()[0]}): it is cut off or "
                                  "damaged; download it again.") from None

    def _header(self, shard: str) -> list[str]:
        """The keys of ``shard``, with each tensor's shape and dtype kept in :attr:`stored`."""
        with self._opened(shard) as f:
            keys = list(f.keys())
            for key in keys:
                sl = f.get_slice(key)
                self.stored[key] = (tuple(sl.get_shape()), sl.get_dtype())
        self._read.add(shard)
        return keys

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def tensor(self, key: str) -> Tensor:
        """The tensor stored under ``key``, memory-mapped in its stored dtype (no copy; valid after the read)."""
        with self._opened(self.weight_map[key]) as f:
            return f.get_tensor(key)

    def meta(self, key: str) -> Tensor:
        """A tensor on the meta device with the stored tensor's shape and dtype (nothing read)."""
        shape, dtype = self.stored[key]
        return torch.empty(shape, dtype=DTYPES.get(dtype, torch.float32), device="meta")

    def dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating-point bytes are stored in."""
        sizes: dict[str, int] = {}
        for shape, dtype in self.stored.values():
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
        return DTYPES.get(max(sizes, key=sizes.get), torch.float32) if sizes else torch.float32

    @property
    def nbytes(self) -> int:
        """Bytes on disk of every shard."""
        return sum((self.folder / s).stat().st_size for s in set(self.weight_map.values()))


class ModuleTensors(Mapping):
    """A model's parameter and buffer names -> the checkpoint's tensors (accelerate's ``weights_map``).

    A name is looked up as it is, then renamed by the family's ``checkpoint_names``, then without the model's
    base prefix (``transformer.``: checkpoints of the bare base model), then as the tensor it is tied to; a tensor
    the family builds from several (``checkpoint_fused``: Mixtral's stacked experts) is built on request.
    """

    def __init__(self, checkpoint: Checkpoint, model: torch.nn.Module, spec: ArchSpec):
        self.checkpoint = checkpoint
        self.spec = spec
        self.names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        self.names += [n for n, _ in model.named_buffers()]
        self.prefix = f"{getattr(model, 'base_model_prefix', '')}."
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # tied name -> the name it repeats
        self.tied = {**{v: k for k, v in tied.items()}, **tied}  # either may be the one stored (GGUF: the LM head)

    def _spellings(self, name: str) -> list[str]:
        candidates = [name]
        for pattern, replacement in self.spec.checkpoint_names:
            candidates.append(re.sub(pattern, replacement, name))
        return candidates + [c[len(self.prefix):] for c in list(candidates) if c.startswith(self.prefix)]

    def key(self, name: str) -> str | None:
        """The checkpoint key holding ``name``, or None."""
        found = next((c for c in self._spellings(name) if c in self.checkpoint), None)
        if found is None and name in self.tied:
            other = self.tied[name]
            return next((c for c in self._spellings(other) if c in self.checkpoint), None)
        return found

    def __getitem__(self, name: str) -> Tensor:
        key = self.key(name)
        if key is not None:
            return self.checkpoint.tensor(key)
        fused = self.spec.checkpoint_fused(name, self._fused_part)
        if fused is not None:
            return fused
        raise KeyError(name)

    def _fused_part(self, key: str) -> Tensor:
        if key not in self.checkpoint:
            raise KeyError(key)
        return self.checkpoint.tensor(key)

    def _meta_part(self, key: str) -> Tensor:
        """A data-free stand-in of the stored tensor (its shape and dtype), to check a fused name cheaply."""
        if key not in self.checkpoint:
            raise KeyError(key)
        return self.checkpoint.meta(key)

    def missing(self, names: list[str]) -> list[str]:
        """Those of ``names`` the checkpoint cannot give (nothing is read to find out)."""
        return [n for n in names if self.key(n) is None and self.spec.checkpoint_fused(n, self._meta_part) is None]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def convert_bin(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write a safetensors copy of a checkpoint stored as PyTorch ``.bin`` shards, one shard in memory at a time
    (its config, tokenizer and other small files copied beside), into ``out`` (default ``<folder>-safetensors``)."""
    folder = Path(folder)
    out = Path(out) if out is not None else folder.with_name(folder.name + "-safetensors")
    shards = sorted(folder.glob("*.bin"))
    if not shards:
        raise CheckpointError(f"{folder} has no .bin weights to convert.")
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        seen: dict[int, str] = {}
        tensors = {}
        for key, t in state.items():  # tied tensors share storage, which safetensors refuses: keep the first
            if t.data_ptr() in seen:
                continue
            seen[t.data_ptr()] = key
            tensors[key] = t.contiguous()
        save_file(tensors, str(out / f".partial-{name}"), metadata={"format": "pt"})
        (out / f".partial-{name}").replace(out / name)
        weight_map |= {key: name for key in tensors}
        del state, tensors
    for small in folder.iterdir():
        if small.is_file() and small.suffix != ".bin" and not small.name.endswith(".bin.index.json"):
            (out / small.name).write_bytes(small.read_bytes())
    atomic_write_text(out / INDEX, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out
