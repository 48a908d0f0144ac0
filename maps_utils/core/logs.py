"""Log messages in notebooks: every warning is shown once per kernel, so a rendered report repeats nothing.

A notebook calls several entry points that each check the same relations (a relation with too few usable pairs is
skipped, and said so, by every one of them); the reader needs the sentence once.
"""

from __future__ import annotations

import logging


class OncePerKernel(logging.Filter):
    """Lets a warning (or worse) through the first time its text is seen at its level, from whichever module; later
    repeats are dropped. Messages below WARNING (progress, timings) always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def notebook_logging(level: int = logging.WARNING, fmt: str | None = None) -> None:
    """A notebook's logging: messages at ``level`` and above on stderr (in ``fmt``, logging's default format unless
    given), each warning once (idempotent: running the cell again adds no second handler or filter)."""
    logging.basicConfig(level=level, **({"format": fmt} if fmt else {}))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OncePerKernel) for f in handler.filters):
            handler.addFilter(OncePerKernel())
