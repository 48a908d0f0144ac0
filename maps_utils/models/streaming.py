"""The streamed model: the checkpoint's architecture with no weights in memory, each module's tensors read from the
safetensors shards (memory-mapped) just when it is used, then dropped.

Static MAPS never needs the whole model at once (E, U, and per layer one attention block's V/O, Q/K for the QK map,
plus block 0's MLP for ``first_mlp``). :func:`streamed_model` builds the model from its config on the ``meta``
device (accelerate's ``init_empty_weights``) and gives every module with parameters an accelerate
``AlignDevicesHook`` whose weights map is the checkpoint (:class:`~.checkpoint.ModuleTensors`). So:

* a forward pass (``context_free``, ``block0``, block 0's MLP) loads each module's weights just before it runs and
  drops them after it: block by block, the whole model is never resident;
* :class:`~maps_utils.heads.HeadWeights` loads the one module an accessor reads (W_V: the value projection, W_O:
  the output projection) for that call, and reads E's rows and U's columns from the memory-mapped tensors as
  stored, converting only those it uses (:mod:`maps_utils.heads.offload`).

Loaded values are the checkpoint's, converted to the compute dtype exactly as ``from_pretrained`` converts them,
so every rank equals the in-memory engine's bit for bit (tests/models/test_streaming.py).

:func:`should_stream` decides the path when the caller leaves it open: stream when the checkpoint is larger than
the free memory of the device it would be loaded on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.hooks import attach_align_device_hook
from torch import nn

from ..heads import spec_for
from .checkpoint import Checkpoint, CheckpointError, ModuleTensors

log = logging.getLogger(__name__)
GB = 1024**3


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's available memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def loaded_bytes(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes the whole model takes once converted to ``dtype``."""
    factor = torch.empty((), dtype=dtype).element_size() / torch.empty((), dtype=checkpoint.dtype()).element_size()
    return int(checkpoint.nbytes * factor)


def should_stream(folder: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether a checkpoint folder of safetensors should be streamed on ``device`` in ``dtype``, and why in words."""
    try:
        checkpoint = Checkpoint(folder)
    except CheckpointError:
        return False, ""  # not a streamable checkpoint: the in-memory path reads it (or says what is wrong)
    need, free = loaded_bytes(checkpoint, dtype), free_memory(device)
    return need > free, (f"the model takes {need / GB:.1f} GB in {str(dtype).removeprefix('torch.')} and {device} "
                         f"has {free / GB:.1f} GB free")


def _vocab_bytes(model: nn.Module, spec, dtype: torch.dtype) -> int:
    """Bytes of U in ``dtype`` (the scan's columns) plus the largest attention block's tensors."""
    unembed = spec.unembed(model).weight
    block = spec.attn(spec.blocks(model)[0])
    size = torch.empty((), dtype=dtype).element_size()
    return (unembed.numel() + sum(p.numel() for p in block.parameters())) * size


def check_room(model: nn.Module, spec, device: torch.device, dtype: torch.dtype, name: str) -> None:
    """One sentence when U in the compute dtype plus one attention block cannot fit on ``device``."""
    need, free = _vocab_bytes(model, spec, dtype), free_memory(device)
    if need > free:
        raise CheckpointError(
            f"Streaming {name} needs about {need / GB:.1f} GB on {device} (U in {str(dtype).removeprefix('torch.')} "
            f"and one attention block) and it has {free / GB:.1f} GB free; free memory there, pick a device with "
            "more, or use a smaller dtype (--dtype bfloat16).")


def _checked(tensors: ModuleTensors, model: nn.Module, folder: Path) -> None:
    """Every parameter is in the checkpoint with the model's shape (one sentence for the first that is not)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False)]
    missing = tensors.missing(names)
    if missing:
        raise CheckpointError(
            f"Checkpoint {folder} lacks {len(missing)} tensor(s) the model its config.json describes needs (first: "
            f"{missing[0]}); download it again, or pass the folder of the checkpoint this config belongs to.")
    for name, param in model.named_parameters(remove_duplicate=False):
        key = tensors.key(name)
        if key is not None and tuple(tensors.checkpoint.meta(key).shape) != tuple(param.shape):
            raise CheckpointError(
                f"Checkpoint {folder} stores {key} as {tuple(tensors.checkpoint.meta(key).shape)} but its config.json "
                f"makes it {tuple(param.shape)}; the config and the weights are of different models.")


@torch.no_grad()
def _init_buffers(model: nn.Module) -> None:
    """The computed buffers (rotary tables, embedding scales) as ``from_pretrained`` leaves them: it initialises them
    again after building the model, outside the dtype it builds in, which changes their last bits (GPT-J's table)."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    for module in model.modules():
        if any(b is not None and not b.is_meta for b in module._buffers.values()):
            init(module)  # its meta parameters, if any, are left as they are (nothing to write)


def streamed_model(folder: str | Path, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str | None = "eager") -> nn.Module:
    """The checkpoint's model with every module's weights streamed from its shards (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    checkpoint = Checkpoint(folder)  # the shards open whole, or one sentence says which one does not
    config = AutoConfig.from_pretrained(folder)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.eval()
    model.requires_grad_(False)
    spec = spec_for(model)
    tensors = ModuleTensors(checkpoint, model, spec)
    _checked(tensors, model, folder)
    check_room(model, spec, device, dtype, folder.name)
    for name, buf in model.named_buffers():  # a buffer the checkpoint stores (rare) is read once and kept
        if tensors.key(name) is not None:
            module, _, leaf = name.rpartition(".")
            model.get_submodule(module).register_buffer(leaf, tensors[name].to(device=device, dtype=buf.dtype))
    _init_buffers(model)
    for module in model.modules():  # rotary tables and other computed buffers, where and as load()'s _finish puts them
        for key, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[key] = buf.to(device=device, dtype=dtype if buf.is_floating_point() else buf.dtype)
    attach_align_device_hook(model, execution_device=device, offload=True, weights_map=tensors)
    model.maps_checkpoint = checkpoint
    return model
