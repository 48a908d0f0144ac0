"""The human study (notebook 05): items for people to judge, their answers, and agreement.

- :mod:`.questions`: the questionnaire: three questions, their answers, the annotator's name.
- :mod:`.material`: :func:`build_material`, items and the answer key from notebook 04's descriptions.
- :mod:`.annotations`: one CSV per annotator, validated, saved atomically under a lock.
- :mod:`.annotator`: the JupyterLab widget that records answers.
- :mod:`.agreement`: inter-annotator κ, correctness rates, the describer and the automatic check against people.
"""

from .agreement import describer_vs_people, detection_vs_people, kappa, kappa_by_question
from .annotations import AnnotationStore, load_annotations, read_annotations
from .annotator import Annotator
from .material import Material, build_material
from .questions import QUESTIONS, AnnotationError

__all__ = ["QUESTIONS", "AnnotationError", "AnnotationStore", "Annotator", "Material", "build_material",
           "describer_vs_people", "detection_vs_people", "kappa", "kappa_by_question", "load_annotations", "read_annotations"]
