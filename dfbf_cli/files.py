"""Writing files safely: never half-written, never over an input, refused before any work when it cannot succeed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from dfbf_cli.errors import DfbfError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # some writers (safetensors) create owner-only files; results are for sharing
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_folder() -> tempfile.TemporaryDirectory:
    """A scratch folder removed afterwards (resolved YAMLs, teacher pseudo-labels, file sizes)."""
    return tempfile.TemporaryDirectory(prefix="dfbf-")


def write_json(path: Path, document: Any) -> None:
    """Strict JSON (non-finite numbers become null), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(document) + "\n")


def strict_json(document: Any) -> str:
    return json.dumps(_finite(document), indent=2, allow_nan=False, default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_json(path: Path, what: str) -> Any:
    """A JSON file dfbf wrote; a damaged one is named, with what to do."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise DfbfError(f"{path} ({what}) is damaged and cannot be read ({error}); delete it to start that step again.") from error


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- the output-path policy, one for every command ------------------------------------------------------


class Kind(Enum):
    FILE = "file"
    DIRECTORY = "directory"


@dataclass(frozen=True)
class Output:
    """A path a command will write, named as the user gave it (``--out``, the run directory...)."""

    label: str
    path: Path
    kind: Kind = Kind.FILE


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def input_paths(**paths: str | Path | None) -> dict[str, Path | None]:
    """The command's inputs that are files or folders (for the output-path policy), by option name."""
    found = {}
    for name, value in paths.items():
        if value is not None and Path(value).expanduser().exists():
            found["MODEL" if name == "model" else "--" + name.replace("_", "-")] = Path(value)
    return found


def check_outputs(outputs: list[Output], inputs: dict[str, Path | None]) -> None:
    """Refuse, before any work, an output that is or lies inside an input (paths resolved, symlinks
    followed), an input inside an output directory, an existing directory where a file belongs (or a
    file where a directory belongs), and a place that cannot be written."""
    sources = {label: Path(p).expanduser().resolve() for label, p in inputs.items() if p is not None}
    for output in outputs:
        target = output.path.expanduser().resolve()
        shown = f"{output.label} {output.path}"
        for label, source in sources.items():
            if target == source:
                raise DfbfError(f"{shown} is {label} itself; choose another path so the input stays intact.")
            if _inside(target, source):
                raise DfbfError(f"{shown} lies inside {label} {source}; choose a path outside the inputs.")
            if output.kind is Kind.DIRECTORY and _inside(source, target):
                raise DfbfError(f"{label} {source} lies inside {shown}, which dfbf writes into; move one of them.")
        if output.kind is Kind.FILE and target.is_dir():
            raise DfbfError(f"{shown} is an existing directory; give a file name.")
        if output.kind is Kind.DIRECTORY and target.exists() and not target.is_dir():
            raise DfbfError(f"{shown} is an existing file; give a directory.")
        place = target if output.kind is Kind.DIRECTORY and target.is_dir() else _existing_ancestor(target.parent)
        if not place.is_dir():
            raise DfbfError(f"{shown} cannot be created: {place} is a file, not a directory.")
        if not os.access(place, os.W_OK | os.X_OK):
            raise DfbfError(f"{shown} cannot be written: {place} is not writable.")


# -- one writer per folder ---------------------------------------------------------------------------------

LOCK_FILE = ".dfbf.lock"


@contextlib.contextmanager
def exclusive(folder: Path, option: str) -> Iterator[None]:
    """Hold an advisory lock on ``folder`` (created if need be) while the block runs: a second dfbf process that
    would write there stops at once, naming the first. The operating system drops the lock with its
    process, so a killed run never leaves a stale one. Readers take no lock."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no advisory locks
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DfbfError(f"{folder} is being written by another dfbf process ({holder}); wait for it to finish, or give another {option}.") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
