"""What every command shares: its options, its output channels, its progress display.

Everything a command prints for people (tables, progress, messages) goes to stderr, and so does
anything a library prints to stdout; stdout carries only the result: the table, or with ``--json``
the JSON document alone. Heavy libraries are imported inside the commands, never here: ``dfbf
--help`` loads this module and nothing of torch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from dfbf_cli import __version__
from dfbf_cli.engine.progress import ProgressEvent
from dfbf_cli.settings import MAX_SEED, Allocation, Criterion, Precision, PresetName, Schedule, Scope, Strategy

if TYPE_CHECKING:
    import torch

TRUST_NOTE = "YOLO checkpoints are read with Ultralytics' restricted loader; set DFBF_TRUST_CHECKPOINTS=1 to load one it refuses."
DeviceOption = Annotated[str, typer.Option("--device", help="Where to compute: auto (CUDA when present), cpu, cuda or cuda:N.")]
PrecisionOption = Annotated[Precision, typer.Option("--precision", help="Arithmetic of synthesis and fine-tuning: auto (bf16 where the GPU or CPU "
    "computes it natively, else fp32), bf16 or fp32.")]
SeedOption = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Random seed: the same seed gives the same result.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings, errors and the final result.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (human output goes to stderr).")]
WeightsOption = Annotated[str | None, typer.Option("--weights", help="For torchvision:NAME / cifar-resnetN: a state_dict file (.pth, .th, "
    ".safetensors) or a torchvision weights name (DEFAULT, IMAGENET1K_V1...).")]
TeacherWeightsOption = Annotated[str | None, typer.Option("--teacher-weights", help="Weights for a torchvision / CIFAR --teacher (as --weights).")]
PresetOption = Annotated[PresetName, typer.Option("--preset", help="Budget: quick (minutes), balanced (the default), paper (the reference settings: slow).")]
RatioOption = Annotated[float | None, typer.Option("--ratio", help="Fraction of each prunable group's channels to remove, 0 < R < 1 (the same "
    "everywhere). Channels, not cost: on yolo11n-pose's backbone 0.3 removes 12 % of the GFLOPs; ask for a cost with --flops.", show_default=False)]
FlopsOption = Annotated[float | None, typer.Option("--flops", help="Instead of --ratio: the GFLOPs to keep, as a fraction of the original's (0.7 = "
    "30 % fewer), shared among the groups by --allocation.", show_default=False)]
ScopeOption = Annotated[Scope, typer.Option("--scope", help="What may be pruned: backbone (DFBF's rule) or trunk (every layer before the task "
    "module; the neck too, for YOLO). The task module always stays bit-identical.")]
AllocationOption = Annotated[Allocation, typer.Option("--allocation", help="How a --flops target is shared: uniform (one ratio, solved) or "
    "sensitivity (groups measured one by one on --synthetic images; the cheapest go first; measured worse than uniform after "
    "fine-tuning on YOLO and CIFAR models, docs/pruning.md).")]
CriterionOption = Annotated[Criterion | None, typer.Option("--criterion", help="Channel importance: l1 (filter L1 norm), bn (BatchNorm |gamma|) "
    "or energy (the signal each channel sends the next layers, measured on synthetic images: before a refit it keeps more, docs/reconstruct.md) "
    "\\[default: energy with --reconstruct, l1 otherwise].", show_default=False)]
ScheduleOption = Annotated[Schedule, typer.Option("--schedule", help="With --ratio: uniform (same ratio everywhere) or layer-dependent (DFBF's "
    "rule: more in wide layers).")]
StrategyOption = Annotated[Strategy, typer.Option("--strategy", help="oneshot (all at once by --criterion) or progressive (Paoding-style: small "
    "steps, channels merged into their most similar survivor, scored on synthetic images).")]
MODEL_HELP = f"A YOLO .pt/.yaml, torchvision:NAME, cifar-resnetN or a dfbf .safetensors. {TRUST_NOTE}"


def _format(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class Session:
    """A running command: where to compute, where to print, how to report the result."""

    device: torch.device
    quiet: bool
    json_mode: bool
    results: Console  # the result table: stdout, or stderr with --json
    messages: Console = field(default_factory=lambda: Console(stderr=True))
    _stdout: Any = None

    def say(self, text: str) -> None:
        """A line for people (stderr), unless --quiet."""
        if not self.quiet:
            self.messages.print(text, highlight=False, soft_wrap=True, markup=False)

    @contextlib.contextmanager
    def progress(self) -> Iterator[Callable[[ProgressEvent], None]]:
        """A progress callback drawing one rich bar per stage on stderr (nothing with --quiet)."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), TextColumn("{task.fields[status]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.messages, disable=self.quiet)
        tasks: dict[str, Any] = {}

        def show(event: ProgressEvent) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = bars.add_task(event.stage, total=event.total, status="")
            status = " · ".join(f"{key} {_format(value)}" for key, value in event.status.items())
            bars.update(tasks[event.stage], completed=event.done, total=event.total, status=status)

        with bars:
            yield show

    def emit(self, result: dict) -> None:
        """Write the machine-readable result (with --json) to the real stdout, as strict JSON."""
        if self.json_mode:
            from dfbf_cli.files import strict_json

            self._stdout.write(strict_json({"dfbf_version": __version__, **result}) + "\n")
            self._stdout.flush()


def _route_logs(quiet: bool) -> None:
    """dfbf's log records through rich on stderr, at the command's verbosity (Ultralytics follows it)."""
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
    dfbf_log = logging.getLogger("dfbf")
    dfbf_log.handlers[:] = [handler]
    dfbf_log.setLevel(logging.WARNING if quiet else logging.INFO)
    dfbf_log.propagate = False


@contextlib.contextmanager
def session(*, device: str, seed: int, quiet: bool, json_mode: bool) -> Iterator[Session]:
    """Set up a command's conventions: logs and library output on stderr, the result on stdout."""
    from dfbf_cli.engine.distributed import launched, process_group
    from dfbf_cli.engine.runtime import resolve_device, seed_everything

    real_stdout = sys.stdout
    speaker = launched().main  # under torchrun, only rank 0 prints
    quiet = quiet or not speaker
    _route_logs(quiet)
    seed_everything(seed)
    results = Console(stderr=True, quiet=not speaker) if json_mode else Console(file=real_stdout, quiet=not speaker)
    ctx = Session(resolve_device(device), quiet, json_mode and speaker, results, _stdout=real_stdout)
    with process_group(ctx.device), contextlib.redirect_stdout(sys.stderr):
        yield ctx
