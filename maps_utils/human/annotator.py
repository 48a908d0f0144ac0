"""The JupyterLab annotator of the human study: one item at a time, saved after every answer."""

from __future__ import annotations

from pathlib import Path

from .annotations import AnnotationStore
from .material import Material
from .questions import CORRECTNESS, OPERATION_KINDS, PATTERN, check_annotator


# ---- the JupyterLab annotator -------------------------------------------------------------------------
class Annotator:
    """One item at a time, with buttons for the three answers, a comment box, back / next and progress.

    Every answer is saved at once (atomically) to ``<folder>/<annotator>.csv``; reopening resumes at the first
    item not yet answered, in the annotator's own shuffled order. ``display(annotator.widget)`` shows it; the
    methods (:meth:`go`, :meth:`next`, :meth:`back`) drive it from code too.
    """

    def __init__(self, material: Material, annotator: str, folder: str | Path = "data/human_study/annotations",
                 seed: int = 0):
        import ipywidgets as w

        check_annotator(annotator)
        self.material = material
        self.annotator = annotator
        self.store = AnnotationStore(Path(folder) / f"{annotator}.csv", material)
        self.order = list(material.sheet(annotator, seed).item)
        self._items = material.items.set_index("item")
        self._loading = False
        self.title = w.HTML()
        self.progress = w.IntProgress(min=0, max=len(self.order), description="answered")
        self.operations = w.HTML()
        self.description = w.HTML()
        self.buttons = {
            "pattern_observable": w.ToggleButtons(options=list(PATTERN), value=None,
                                                  description="Pattern observable?"),
            "description_correct": w.ToggleButtons(options=list(CORRECTNESS), value=None,
                                                   description="Description is"),
            "operation_kind": w.ToggleButtons(options=list(OPERATION_KINDS), value=None, description="Kind"),
        }
        for b in self.buttons.values():
            b.style.description_width = "140px"
        self.comment = w.Textarea(placeholder="optional comment", continuous_update=False, layout=w.Layout(width="95%", height="48px"))
        self.back_button = w.Button(description="◀ back")
        self.next_button = w.Button(description="next ▶", button_style="primary")
        self.status = w.HTML()
        for field, b in self.buttons.items():
            b.observe(lambda change, f=field: self._changed(f, change["new"]), names="value")
        self.comment.observe(lambda change: self._changed("comment", change["new"]), names="value")
        self.back_button.on_click(lambda _: self.back())
        self.next_button.on_click(lambda _: self.next())
        self.widget = w.VBox([self.title, self.progress, self.operations, self.description, *self.buttons.values(),
                              self.comment, w.HBox([self.back_button, self.next_button]), self.status])
        todo = [i for i, item in enumerate(self.order) if not self.store.complete(item)]
        self.go(todo[0] if todo else len(self.order) - 1)

    @property
    def item(self) -> str:
        return self.order[self.pos]

    def answered(self) -> int:
        return sum(self.store.complete(i) for i in self.order)

    def go(self, pos: int) -> None:
        import html

        self.pos = max(0, min(len(self.order) - 1, pos))
        row = self._items.loc[self.item]
        saved = self.store.rows.get(self.item, {})
        self._loading = True
        try:
            for field, b in self.buttons.items():
                b.value = saved.get(field) or None
            self.comment.value = saved.get("comment", "")
        finally:
            self._loading = False
        self.title.value = f"<b>{html.escape(self.annotator)}</b> · {self.item} ({self.pos + 1} of {len(self.order)})"
        self.operations.value = ("<p>Salient tokens and their top mappings (<code>token: m1, m2, …</code>):</p>"
                                 f"<pre>{html.escape(row.operations)}</pre>")
        self._description = row.description
        shown = getattr(row, "executable_description", "")
        self._executable = shown if isinstance(shown, str) else ""  # absent, or NaN where a sheet has none
        self._refresh()

    def next(self) -> None:
        self.go(self.pos + 1)

    def back(self) -> None:
        self.go(self.pos - 1)

    def _changed(self, field: str, value) -> None:
        if self._loading:
            return
        self.store.answer(self.item, **{field: value or ""})
        if field == "pattern_observable" and value == "no":  # the store cleared the kind; so does the view
            self._loading = True
            try:
                self.buttons["operation_kind"].value = None
            finally:
                self._loading = False
        self._refresh()

    def _refresh(self) -> None:
        import html

        if self.buttons["pattern_observable"].value is None:  # judge the operations before reading the description
            self.description.value = "<p><i>Answer the first question to see the description.</i></p>"
        else:
            self.description.value = f"<p><b>Description:</b> {html.escape(self._description)}</p>" + (
                f"<p><b>Executable description:</b> {html.escape(self._executable)}</p>" if self._executable else "")
        done = self.answered()
        self.progress.value = done
        need_kind = self.buttons["pattern_observable"].value != "no"
        self.buttons["operation_kind"].disabled = not need_kind
        state = "answered" if self.store.complete(self.item) else "not answered yet"
        self.status.value = (f"{done} of {len(self.order)} answered; this item: {state}. "
                             f"Saved to <code>{self.store.path}</code>.")
