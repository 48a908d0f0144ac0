"""Models past one device: accelerate's big-model inference, the engine under ``from_pretrained``, nnsight and
TransformerLens.

``load(name, device_map=..., max_memory=..., offload_folder=...)`` hands these options to
``AutoModelForCausalLM.from_pretrained``: it infers a map (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
``"sequential"``: accelerate's ``infer_auto_device_map`` within ``max_memory``) or takes the one given
(``{module name: device}``, a device being a GPU index, ``"cuda:N"``, ``"cpu"`` or ``"disk"``), puts each module's
weights on its device, in CPU memory or on disk, and attaches accelerate's hooks: each module runs on its execution
device, offloaded weights are loaded just before it runs and dropped after. On a machine with GPUs, modules mapped to
``"cpu"`` or ``"disk"`` run on the first GPU (their weights are only kept there); on a CPU-only machine, on the CPU.

Every step then works as on one device: a forward pass moves its inputs to each module (the hooks), the steps' own
hooks gather what they read onto the device of the pass's inputs, and :class:`~maps_utils.heads.HeadWeights` reads
offloaded parameters through the same hooks (:mod:`maps_utils.heads.offload`) and returns every tensor on its
compute device, the LM head's.

This module checks the options before anything is loaded (one sentence for a device that does not exist, a size
accelerate cannot read, a module the model does not have) and reads them from the shell:
``make all DEVICE_MAP=auto MAX_MEMORY=0:70GiB,1:70GiB,cpu:200GiB``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core.errors import OptionError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_FIX = "name cpu, disk or a GPU this machine has (0, 1 … or cuda:0 …), or use device_map auto"


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """A device map from Python or the shell: None (or ``""``, ``"none"``) for one device; a strategy of
    :data:`STRATEGIES`; a dict ``{module name: device}``, written in the shell as a JSON object or a ``.json`` file."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return None
    if text in STRATEGIES:
        return text
    if text.endswith(".json") and not text.startswith("{"):
        try:
            text = Path(text).expanduser().read_text(encoding="utf-8")
        except OSError as err:
            raise OptionError(f"The device_map file {value} cannot be read ({err.strerror or err}); check the path.") \
                from None
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise OptionError(f"Unknown device_map '{value}'; use {', '.join(STRATEGIES)}, or a JSON object of module "
                          'names and devices such as \'{"model.embed_tokens": 0, "model.layers.0": 0, ...}\'.')
    return parsed


def parse_max_memory(value: str | dict | None) -> dict | None:
    """A ``max_memory`` from Python or the shell: None (or ``""``); a dict ``{device: size}``; or
    ``"0:70GiB,1:70GiB,cpu:200GiB"`` (a JSON object works too). Sizes are bytes or accelerate's ``"70GiB"``,
    ``"500MB"``."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return None
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise OptionError(f"max_memory '{value}' is not a JSON object; write it as 0:70GiB,1:70GiB,cpu:200GiB.")
        return parsed
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.rpartition(":")
        if not sep or not device or not size:
            raise OptionError(f"max_memory '{value}' has the entry '{part}', which is not device:size; write it as "
                              "0:70GiB,1:70GiB,cpu:200GiB.")
        out[device.strip()] = size.strip()
    return out


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device(value, what: str) -> str | int:
    """``value`` as accelerate names a device (a GPU index, ``"cpu"``, ``"disk"``, ``"mps"``), or one sentence saying
    that this machine does not have it (``what`` says where the value came from)."""
    if isinstance(value, bool):
        raise OptionError(f"{what} is {value}, which is not a device; {_FIX}.")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, str) and value.strip() == "disk":
        return "disk"
    try:
        dev = torch.device("cuda", value) if isinstance(value, int) else torch.device(str(value).strip())
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"{what} is '{value}', which is not a device; {_FIX}.") from None
    n = _cuda_count()
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        if index >= n:
            has = f"has {n} CUDA device(s)" if n else f"has no CUDA device this torch ({torch.__version__}) can use"
            raise OptionError(f"{what} is '{value}', which does not exist: this machine {has}; {_FIX}.")
        return index
    if dev.type == "cpu" and dev.index in (None, 0):
        return "cpu"
    if dev.type == "mps" and dev.index in (None, 0) and torch.backends.mps.is_available():
        return "mps"
    raise OptionError(f"{what} is '{value}', which this machine does not have; {_FIX}.")


def check_placement(device_map, max_memory=None, offload_folder=None, device=None, stream=None) -> dict | None:
    """``from_pretrained``'s placement keywords: ``device_map``, with ``max_memory`` and ``offload_folder`` where
    given, checked and in accelerate's spelling (GPU indices as ints); None for a model on one device. Each option that
    cannot work is one sentence naming the fix: ``device`` must be left to the map (None or ``"auto"``), and
    ``stream`` is another way past one device."""
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise OptionError("max_memory and offload_folder only apply with a device_map; add device_map auto (or "
                              "leave them out for one device).")
        return None
    if device is not None and str(device) != "auto":
        raise OptionError(f"device '{device}' and a device_map both say where the model goes; leave device at auto "
                          "(the map's devices are the model's), or drop the device_map.")
    if stream:
        raise OptionError("stream and device_map are two ways to run a model larger than one device; pass one of them "
                          "(stream for the static steps on one device, device_map for every step).")
    if isinstance(device_map, dict):
        if not device_map:
            raise OptionError(f"The device_map is empty; give every module a device, or use {', '.join(STRATEGIES)}.")
        device_map = {str(k): _device(v, f"device_map's device for {repr(str(k)) if k else 'the whole model'}")
                      for k, v in device_map.items()}
    placed: dict[str, object] = {"device_map": device_map}
    if max_memory is not None:
        from accelerate.utils import convert_file_size_to_int

        placed["max_memory"] = {}
        for k, size in max_memory.items():
            size = int(size) if isinstance(size, str) and size.strip().isdigit() else size  # bytes, from the shell
            try:
                convert_file_size_to_int(size)
            except (ValueError, TypeError):
                raise OptionError(f"max_memory gives {k} the size '{size}'; use bytes or a size such as 70GiB or "
                                  "500MB.") from None
            placed["max_memory"][_device(k, "A max_memory device")] = size
    if offload_folder is not None:
        folder = Path(offload_folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise OptionError(f"offload_folder {offload_folder} is a file; name a folder (it is made if missing).")
        placed["offload_folder"] = str(folder)
    return placed


def from_pretrained(path: str | Path, placed: dict | None, model_kwargs: dict, **hub):
    """``AutoModelForCausalLM.from_pretrained(path, **model_kwargs, **hub)`` placed as ``placed`` says
    (:func:`check_placement`; None: one device, left to the caller). A dict map's module names are checked first
    (:func:`check_modules`); weights sent to disk that need an ``offload_folder`` are one sentence."""
    from transformers import AutoModelForCausalLM

    if placed is None:
        return AutoModelForCausalLM.from_pretrained(path, **model_kwargs, **hub)
    if isinstance(placed["device_map"], dict):
        map_model(path, placed["device_map"], **hub)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **model_kwargs, **placed, **hub)
    except ValueError as err:
        if "offload_folder" not in str(err):
            raise
        raise OptionError(f"Some weights the device map sends to disk must be written out again for {path} (its "
                          "checkpoint is not safetensors, or the model keeps them in another layout, as Mixtral's "
                          "experts); pass an offload_folder with room for them (make all OFFLOAD_FOLDER=...).") from None


def check_modules(device_map: dict, model: nn.Module) -> None:
    """Every key of a dict ``device_map`` names a module of ``model`` (built on ``meta``) and every parameter falls
    under one; else one sentence."""
    modules = dict(model.named_modules())
    unknown = [k for k in device_map if k not in modules]
    if unknown:
        raise OptionError(f"device_map names '{unknown[0]}', which {type(model).__name__} does not have; use its "
                          f"module names ({', '.join(list(modules)[1:4])} …), or device_map auto.")
    keys = sorted(device_map, key=len, reverse=True)
    for name, _ in model.named_parameters():
        if not any(k == "" or name == k or name.startswith(k + ".") for k in keys):
            raise OptionError(f"device_map gives no device to {name}; add its module (or a module above it), or "
                              "use device_map auto.")


def map_model(folder: str | Path, device_map: dict, **hub) -> None:
    """:func:`check_modules` on the model ``folder``'s config describes, built on ``meta`` (nothing is loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, **hub)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    check_modules(device_map, model)


def placement(model: nn.Module) -> dict[str, str]:
    """``{module name: device}`` as the model was dispatched (``hf_device_map``), devices as strings; {} for a model
    on one device."""
    return {name: str(dev) for name, dev in (getattr(model, "hf_device_map", None) or {}).items()}
