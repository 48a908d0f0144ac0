"""Forward passes that stop early: hooks record what they need and raise :class:`StopForward` once done.

Under a device map (``load(device_map=...)``) each layer runs on its own device, so a hook reads its tensor there
(:func:`pick`) and hands the rows it keeps to one device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class StopForward(Exception):
    """Raised by a hook once everything needed has been read; nothing later in the model runs."""


def pick(x: Tensor, *index: Tensor, to: torch.device | str) -> Tensor:
    """``x[index]`` indexed on ``x``'s device (the index tensors go there), returned on ``to``. On one device nothing
    is copied but the picked rows themselves."""
    return x[tuple(i.to(x.device) for i in index)].to(to)


def run_until_stop(model, handles: Iterable, **inputs) -> None:
    """Run ``model(**inputs)`` until a hook raises :class:`StopForward` (or the pass ends); remove ``handles`` after."""
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
