"""One progress event for every long step; the CLI draws them, the engine only emits them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` (``total`` None: not known yet), with a few figures to show."""

    stage: str
    done: float
    total: float | None
    status: dict[str, object] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


def ignore(_event: ProgressEvent) -> None:
    """The callback of a caller that shows no progress."""
