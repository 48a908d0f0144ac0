"""Renamed public names: the old spelling keeps working for one release, with a DeprecationWarning naming the new one.

- :func:`renamed_arguments`: keyword arguments of a function (or of a dataclass's constructor).
- :func:`renamed_attribute`: an attribute, as a property that reads and writes the new one.
- :func:`renamed_function`: a function, as a thin alias that calls the new one.
- :func:`renamed_constants`: module constants, as the module's ``__getattr__`` (PEP 562).

Only the spelling changes: values, stored tables and cache keys are the same under either name.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

__all__ = ["renamed", "renamed_arguments", "renamed_attribute", "renamed_constants", "renamed_function"]


def renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now called ``new`` (a DeprecationWarning pointing at the caller's line)."""
    warnings.warn(f"{old} is renamed {new}; use {new} (the old name goes in the next release).", DeprecationWarning,
                  stacklevel=stacklevel)


def renamed_arguments(**names: str):
    """Decorator: the keyword arguments ``old=new`` of ``names`` are accepted under their old name with a
    DeprecationWarning; both names at once are a TypeError. On a class, its ``__init__`` is wrapped (put it above
    ``@dataclass``)."""

    def wrap(obj):
        if isinstance(obj, type):
            obj.__init__ = wrap(obj.__init__)
            return obj
        qualname = obj.__qualname__.removesuffix(".__init__")

        @functools.wraps(obj)
        def call(*args, **kwargs):
            for old, new in names.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{qualname}() got {old}= and {new}=; pass {new}= only ({old} is its old name).")
                    renamed(f"{qualname}({old}=...)", f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return obj(*args, **kwargs)

        return call

    return wrap


def renamed_attribute(old: str, new: str) -> property:
    """A property ``old`` that reads (and, where the class allows it, writes) attribute ``new`` with a warning."""

    def get(self):
        renamed(f"{type(self).__name__}.{old}", f".{new}")
        return getattr(self, new)

    def put(self, value):
        renamed(f"{type(self).__name__}.{old}", f".{new}")
        setattr(self, new, value)

    return property(get, put, doc=f"Deprecated name of :attr:`{new}`.")


def renamed_function(func: Callable, old: str) -> Callable:
    """``func`` under its old name ``old``: the same call, with a DeprecationWarning."""

    @functools.wraps(func)
    def alias(*args, **kwargs):
        renamed(f"{old}()", f"{func.__name__}()")
        return func(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated name of :func:`{func.__name__}`."
    return alias


def renamed_constants(namespace: dict, names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` serving each old constant of ``names`` (old -> new) from ``namespace`` (the module's
    ``globals()``) with a DeprecationWarning; usage: ``__getattr__ = renamed_constants(globals(), {...})``."""
    module = namespace["__name__"]

    def __getattr__(name: str):
        if name in names:
            renamed(f"{module}.{name}", names[name])
            return namespace[names[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
