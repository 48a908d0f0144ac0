"""Forward passes that stop early: hooks record what they need and raise :class:`StopForward` once done."""

from __future__ import annotations

from collections.abc import Iterable


class StopForward(Exception):
    """Raised by a hook once everything needed has been read; nothing later in the model runs."""


def run_until_stop(model, handles: Iterable, **inputs) -> None:
    """Run ``model(**inputs)`` until a hook raises :class:`StopForward` (or the pass ends); remove ``handles`` after."""
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
