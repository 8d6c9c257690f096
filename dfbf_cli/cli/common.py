"""What every command shares: its options, its output channels and its exit codes.

Human output (tables, progress, warnings) goes to stderr when ``--json`` is given, so stdout
carries only the JSON document; without ``--json`` tables go to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dfbf_cli import __version__
from dfbf_cli.engine.runtime import resolve_device, seed_everything

DeviceOption = Annotated[str, typer.Option("--device", help="Where to compute: auto (CUDA when present), cpu, cuda or cuda:N.")]
PrecisionOption = Annotated[str, typer.Option("--precision", help="Arithmetic of synthesis and fine-tuning: auto (bf16 where the GPU or CPU computes it natively, else fp32), bf16 or fp32.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same result.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings, errors and the final result.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (human output goes to stderr).")]
WeightsOption = Annotated[
    str | None,
    typer.Option("--weights", help="For torchvision:NAME / cifar-resnetN: a state_dict file (.pth, .th, .safetensors) or a torchvision weights name (DEFAULT, IMAGENET1K_V1...)."),
]

TeacherWeightsOption = Annotated[str | None, typer.Option("--teacher-weights", help="Weights for a torchvision / CIFAR --teacher (as --weights).")]


@dataclass
class Session:
    """A running command: where to compute, where to print, how to report the result."""

    device: torch.device
    console: Console
    quiet: bool
    json_mode: bool
    _stdout: Any

    def progress(self) -> Progress:
        """A rich progress bar on stderr (hidden with --quiet)."""
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=self.quiet, transient=False,
        )

    def emit(self, result: dict) -> None:
        """Write the machine-readable result (with --json) to the real stdout."""
        if self.json_mode:
            self._stdout.write(json.dumps({"dfbf_version": __version__, **result}, indent=2, default=str) + "\n")
            self._stdout.flush()


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler bound to whatever ``sys.stderr`` is when it writes (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _route_library_logs(quiet: bool) -> None:
    """dfbf's own log records through rich on stderr; Ultralytics' logger onto stderr too, so that
    stdout holds only results (tables, or the JSON document)."""
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
    dfbf_log = logging.getLogger("dfbf")
    dfbf_log.handlers[:] = [handler]
    dfbf_log.setLevel(logging.WARNING if quiet else logging.INFO)
    dfbf_log.propagate = False
    from ultralytics.utils import LOGGER as ultralytics_log  # configures its handler on import: import first

    for index, existing in enumerate(ultralytics_log.handlers):
        if type(existing) is logging.StreamHandler:
            replacement = CurrentStderrHandler()
            replacement.setFormatter(existing.formatter)
            replacement.setLevel(existing.level)
            ultralytics_log.handlers[index] = replacement
    ultralytics_log.setLevel(logging.WARNING if quiet else logging.INFO)


@contextlib.contextmanager
def session(*, device: str, seed: int, quiet: bool, json_mode: bool) -> Iterator[Session]:
    """Set up a command's conventions; with --json, anything printed to stdout is moved to stderr."""
    real_stdout = sys.stdout
    _route_library_logs(quiet)
    seed_everything(seed)
    ctx = Session(resolve_device(device), Console(stderr=json_mode), quiet, json_mode, real_stdout)
    if json_mode:
        with contextlib.redirect_stdout(sys.stderr):
            yield ctx
    else:
        yield ctx
