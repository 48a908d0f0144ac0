"""The human study's questionnaire: the three questions, their answers, the answer sheet's columns and the
annotator's name (``data/human_study/PROTOCOL.md``)."""

from __future__ import annotations

import re

from ..core.deprecation import renamed_constants
from ..core.errors import MapsError

PATTERN = ("yes", "no")
CORRECTNESS = ("correct", "partially", "incorrect")
OPERATION_KINDS = ("semantic", "lexical-morphological", "algorithmic-string", "translation-multilingual", "other")
QUESTIONS = {"pattern_observable": PATTERN, "description_correct": CORRECTNESS, "operation_kind": OPERATION_KINDS}
ANSWER_COLUMNS = ["item", "material", "pattern_observable", "description_correct", "operation_kind", "comment",
                  "annotated_at"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # whole name (fullmatch): it names the annotator's file
__getattr__ = renamed_constants(globals(), {"KINDS": "OPERATION_KINDS"})  # renamed in 0.2


class AnnotationError(MapsError):
    """An annotation file or value is invalid."""


def check_annotator(name: str) -> str:
    """The annotator's name, if it can name a file: 1 to 64 letters, digits, '_', '-' or '.', the first a letter or
    digit, nothing else (no spaces, slashes or newlines)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AnnotationError(f"Annotator name {name!r}: use letters, digits, '_', '-' or '.' only, 1 to 64 of them "
                              "starting with a letter or digit (no spaces, slashes or newlines), since it names the file.")
    return name
