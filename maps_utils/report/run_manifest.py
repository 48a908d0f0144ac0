"""The run manifest of ``make all``: one record per executed notebook in ``results/<model>/manifest.json``.

After each notebook, ``maps run-manifest`` adds a step: its wall time, the papermill parameters it ran with (device,
dtype, seeds …) and its report, beside the versions, the git commit and the model's weights hash.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from ..core.hashing import file_sha256
from ..core.manifest import build_manifest, read_manifest, write_manifest
from ..core.paths import default_cache_dir
from ..core.store import result_folder
from ..models.loading import EMBEDDED

log = logging.getLogger(__name__)


def model_file_hash(name: str) -> dict:
    """Where a model's weights came from and their sha256 (embedded GGUF, local .gguf or safetensors); HF ids and
    unknown layouts get only the name."""
    path = None
    if name in EMBEDDED:
        path = EMBEDDED[name].locate_gguf(default_cache_dir())
    elif Path(name).is_file():
        path = Path(name)
    elif (Path(name) / "model.safetensors").is_file():
        path = Path(name) / "model.safetensors"
    return {"name": name, "file": str(path) if path else None, "sha256": file_sha256(path) if path else None}


def notebook_defaults(nb: dict) -> dict:
    """The literal defaults of a notebook's cell tagged ``parameters`` (what papermill did not override)."""
    out = {}
    for cell in nb.get("cells", []):
        if "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        for node in ast.parse(src).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    out[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return out


def notebook_parameters(notebook: str | Path) -> dict:
    """An executed notebook's parameters (its defaults, then papermill's values); {} when it cannot be read."""
    try:
        nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
        return notebook_defaults(nb) | nb.get("metadata", {}).get("papermill", {}).get("parameters", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, SyntaxError) as err:
        log.warning("the parameters of %s could not be read (%s); the step is recorded without them", notebook,
                    type(err).__name__)
        return {}


def _step_ok(step) -> bool:
    return isinstance(step, dict) and isinstance(step.get("parameters"), dict) and \
        isinstance(step.get("seconds"), (int, float))


def record_step(results_dir: str | Path, model: str, step: str, seconds: float, notebook: str | Path | None = None) -> Path:
    """Add one executed step (a notebook) to the run manifest ``<results_dir>/<model>/manifest.json``: versions, git
    commit, the model and its weights' hash, and per step its wall time, papermill parameters (device, dtype,
    seeds …) and report path. Written atomically; earlier steps are kept (a cut-off or corrupt manifest, or a
    step that is not a record, is noticed and dropped)."""
    path = result_folder(results_dir, model, "manifest.json")
    run = read_manifest(path) or {}  # a cut-off or corrupt one is noticed and started again
    params = notebook_parameters(notebook) if notebook is not None else {}
    base = build_manifest(parameters={}, wall_seconds=0.0)
    run.update({k: base[k] for k in ("git_commit", "python", "machine", "versions")})
    run["model"] = run.get("model") or model_file_hash(model)
    run["updated"] = base["created"]
    steps = {name: s for name, s in (run.get("steps") or {}).items() if _step_ok(s)} \
        if isinstance(run.get("steps"), dict) else {}
    run["steps"] = steps
    steps[step] = {"seconds": round(float(seconds), 1), "finished": base["created"], "parameters": params,
                   "report": str(notebook) if notebook else None}
    run["device"] = sorted({str(s["parameters"].get("device")) for s in steps.values() if s["parameters"]})
    run["dtype"] = sorted({str(s["parameters"].get("dtype")) for s in steps.values() if s["parameters"]})
    run["seeds"] = {name: s["parameters"]["seed"] for name, s in steps.items() if "seed" in s["parameters"]}
    run["total_seconds"] = round(sum(s["seconds"] for s in steps.values()), 1)
    return write_manifest(path, run)
