"""Ultralytics as dfbf uses it: imported with its pip installs off and its log on stderr, its thread
setting undone, its checkpoints read with its restricted loader. Every YOLO module goes through here."""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dfbf_cli.errors import DfbfError

TRUST_VARIABLE = "DFBF_TRUST_CHECKPOINTS"  # =1: unpickle YOLO checkpoints without restriction (they can run code)
OPENVINO_SUFFIX = "_openvino_model"  # how ultralytics.YOLO(path) tells an OpenVINO folder


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when it writes (commands and tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def ultralytics():
    """Ultralytics, imported with its run-time pip installs switched off (dfbf names what to install
    instead) and its log on stderr, as verbose as dfbf's own."""
    os.environ["YOLO_AUTOINSTALL"] = "false"
    import ultralytics as package
    from ultralytics.utils import LOGGER, checks

    checks.AUTOINSTALL = False
    for index, handler in enumerate(LOGGER.handlers):
        if type(handler) is logging.StreamHandler:
            replacement = _CurrentStderr()
            replacement.setFormatter(handler.formatter)
            replacement.setLevel(handler.level)
            LOGGER.handlers[index] = replacement
    LOGGER.setLevel(logging.getLogger("dfbf").getEffectiveLevel())
    return package


@contextmanager
def keeping_torch_threads() -> Iterator[None]:
    """Ultralytics' device selection sets torch's CPU threads to its own count (cores − 1, at most 8) for
    the rest of the process: on 2 cores, 1 thread. dfbf puts the caller's back, so that fine-tuning and
    timing after an evaluation are not slowed."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_checkpoint(spec: str, path: Path) -> dict:
    """A checkpoint file (downloaded by name where online), unpickled with Ultralytics' restricted loader."""
    ultralytics()
    from ultralytics.nn.tasks import torch_safe_load

    trusted = os.environ.get(TRUST_VARIABLE) == "1"
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DfbfError(f"Cannot load '{spec}' as an Ultralytics YOLO model: it is not a PyTorch checkpoint archive (empty, truncated or another "
            f"kind of file).")
    try:
        checkpoint, _ = torch_safe_load(str(path) if path.exists() else spec, safe_only=not trusted)
    except TypeError as error:
        if "outside the supported" in str(error):
            raise DfbfError(f"'{spec}' holds objects outside Ultralytics' checkpoint format, and unpickling them could run code, so dfbf "
                            f"refuses it; if you trust the file, run again with {TRUST_VARIABLE}=1.") from error
        raise DfbfError(f"Cannot load '{spec}' as an Ultralytics YOLO model: {first_line(error)}") from error
    except (FileNotFoundError, ConnectionError) as error:
        raise DfbfError(f"Model '{spec}' is not a local file and could not be downloaded ({first_line(error)}); "
                        "download it where you are online, or pass the path of a local checkpoint.") from error
    except Exception as error:  # a corrupt or foreign file: the loader raises many types
        raise DfbfError(f"Cannot load '{spec}' as an Ultralytics YOLO model: {first_line(error)}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("ema") or checkpoint.get("model"), nn.Module):
        raise DfbfError(f"'{spec}' is not an Ultralytics checkpoint (no model in it).")
    return checkpoint


def task_of(model: nn.Module) -> str:
    """The task, from the task module itself (a checkpoint's recorded task can be stale)."""
    from ultralytics.nn.modules import OBB, Classify, Detect, Pose, Segment

    head = model.model[-1]
    for kind, task in ((Pose, "pose"), (Segment, "segment"), (OBB, "obb"), (Classify, "classify"), (Detect, "detect")):
        if isinstance(head, kind):
            return task
    return type(head).__name__


def first_line(error: Exception) -> str:
    return str(error).replace("ERROR ❌️", "").replace("❌", "").strip().splitlines()[0]
