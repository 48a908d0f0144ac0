"""Notebook logging: a warning appears once per kernel, from whichever module repeats it."""

from __future__ import annotations

import logging
import subprocess
import sys


def test_a_repeated_warning_is_shown_once_and_others_still_pass():
    code = (
        "import logging\n"
        "from maps_utils.core.logs import notebook_logging\n"
        "notebook_logging(); notebook_logging()\n"  # a cell run twice adds nothing
        "a, b = logging.getLogger('maps_utils.static.scores'), logging.getLogger('maps_utils.dynamic.scores')\n"
        "for _ in range(3):\n"
        "    a.warning('relation %s skipped: %d usable pairs', 'year_following', 0)\n"
        "b.warning('relation %s skipped: %d usable pairs', 'year_following', 0)\n"
        "a.warning('relation %s skipped: %d usable pairs', 'other', 2)\n"
        "a.error('relation %s skipped: %d usable pairs', 'other', 2)\n"
        "a.info('not shown below WARNING')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = err.strip().splitlines()
    assert lines == [
        "WARNING:maps_utils.static.scores:relation year_following skipped: 0 usable pairs",
        "WARNING:maps_utils.static.scores:relation other skipped: 2 usable pairs",
        "ERROR:maps_utils.static.scores:relation other skipped: 2 usable pairs",
    ], err


def test_messages_below_warning_always_pass():
    from maps_utils.core.logs import OncePerKernel

    once = OncePerKernel()
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "progress %d", (1,), None)
    warn = logging.LogRecord("x", logging.WARNING, __file__, 1, "skipped %d", (1,), None)
    assert once.filter(info) and once.filter(info)
    assert once.filter(warn) and not once.filter(warn)
