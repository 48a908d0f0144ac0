"""Reading the parameters of modules whose weights live elsewhere: offloaded by accelerate's big-model inference
(``device_map`` with CPU or disk offload) or streamed from a checkpoint (:mod:`maps_utils.models.streaming`).

Both leave such a module's parameters on the ``meta`` device and attach an accelerate ``AlignDevicesHook`` that
loads them from its ``weights_map`` just before the module's forward and drops them just after. A forward pass
therefore needs nothing from here. The static engine reads parameters without running the module (W_V, W_O, a
norm's gain); :func:`materialized` loads them for the duration of a ``with`` block, through the same hooks, and
:func:`stored` gives a tensor as the checkpoint stores it (its own dtype, memory-mapped) without converting it.

A tensor read inside the block stays valid after it: the hook only swaps the module's parameter back to ``meta``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn


def offload_hook(module: nn.Module):
    """The module's accelerate hook when it loads offloaded weights, else None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    hooks = getattr(hook, "hooks", None) or (hook,)  # a SequentialHook holds several
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def has_offload(model: nn.Module) -> bool:
    """Whether any module of ``model`` has its weights offloaded (or streamed)."""
    return any(offload_hook(m) is not None for m in model.modules())


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=False))


class Offloaded:
    """Where the offload hooks of one model sit: every hooked module and, for any module, the hooked module that
    loads its parameters (itself, or an ancestor whose hook places its submodules)."""

    def __init__(self, model: nn.Module):
        self.hooked: dict[nn.Module, object] = {}
        self.owner: dict[nn.Module, tuple[nn.Module, str]] = {}  # module -> (hooked module, its name under it)
        by_name = dict(model.named_modules())
        for module in by_name.values():
            if (hook := offload_hook(module)) is not None:
                self.hooked[module] = hook
        for name, module in by_name.items():
            parts = name.split(".") if name else []
            for cut in range(len(parts), -1, -1):  # itself, then its nearest hooked ancestor
                holder = by_name.get(".".join(parts[:cut]))
                if holder in self.hooked:
                    self.owner[module] = (holder, ".".join(parts[cut:]))
                    break

    def _to_load(self, module: nn.Module) -> list[nn.Module]:
        """The hooked modules that hold ``module``'s parameters and its submodules'."""
        inside = [m for m in module.modules() if m in self.hooked]
        if inside:
            return inside
        owner = self.owner.get(module)
        return [owner[0]] if owner is not None else []

    @contextlib.contextmanager
    def materialized(self, *modules: nn.Module) -> Iterator[None]:
        """Every parameter of ``modules`` (and their submodules) loaded on its execution device, for the block."""
        loaded = []
        try:
            for module in modules:
                for m in self._to_load(module):
                    if m not in loaded and any(p.is_meta for p in m.parameters()):
                        self.hooked[m].pre_forward(m)
                        loaded.append(m)
            yield
        finally:
            for m in reversed(loaded):
                self.hooked[m].post_forward(m, None)

    def stored(self, module: nn.Module, name: str) -> Tensor:
        """``module``'s parameter ``name`` as it is stored (dtype and device of the checkpoint or offload), or the
        parameter itself where it is resident."""
        param = getattr(module, name)
        if not param.is_meta or module not in self.owner:
            return param
        owner, path = self.owner[module]
        return self.hooked[owner].weights_map[f"{path}.{name}" if path else name]
