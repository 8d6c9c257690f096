"""The record dfbf writes into every export (``dfbf.json``): what the export is, from what, calibrated how.

Below both engine and adapters: the engine writes it, an adapter reads it back to score the export.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import EXPORT_EXTRA, EXPORT_PACKAGES, ExportFormat

RECORD = "dfbf.json"  # beside an exported folder's files; inside an .onnx file's metadata under this key


def check_packages(fmt: ExportFormat) -> None:
    """The runtime packages ``fmt`` needs are installed (Ultralytics would try to pip-install them)."""
    missing = [name for name in EXPORT_PACKAGES[ExportFormat(fmt)] if importlib.util.find_spec(name) is None]
    if missing:
        raise DfbfError(f"Exporting to {fmt} needs {', '.join(missing)}: install dfbf's export extra ({EXPORT_EXTRA}).")


def write_record(artefact: Path, record: dict) -> None:
    """Beside a folder's files, or in an .onnx file's metadata."""
    if artefact.is_dir():
        (artefact / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    else:
        _embed(artefact, record)


def _embed(onnx_file: Path, record: dict) -> None:
    import onnx

    model = onnx.load(str(onnx_file))
    entry = next((p for p in model.metadata_props if p.key == RECORD), None) or model.metadata_props.add()
    entry.key, entry.value = RECORD, json.dumps(record)
    onnx.save(model, str(onnx_file))


def read_record(path: Path) -> dict | None:
    """The record of a dfbf export (folder or .onnx), or None if dfbf did not write it."""
    try:
        if path.is_dir():
            return json.loads((path / RECORD).read_text()) if (path / RECORD).is_file() else None
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        entry = next((p for p in model.metadata_props if p.key == RECORD), None)
        return None if entry is None else json.loads(entry.value)
    except Exception as error:  # a damaged file: onnx and json raise many types
        raise DfbfError(f"'{path}' is not a readable export ({str(error).splitlines()[0] if str(error) else type(error).__name__}).") from error
