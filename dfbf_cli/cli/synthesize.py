"""``dfbf synthesize``: dream up a synthetic dataset from the model itself, or inspect one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfbf_cli.cli.common import (
    TRUST_NOTE,
    DeviceOption,
    JsonOption,
    PrecisionOption,
    PresetOption,
    QuietOption,
    SeedOption,
    WeightsOption,
    session,
)
from dfbf_cli.errors import DfbfError, refuse_unused
from dfbf_cli.settings import DEFAULT_PRESET, SYNTHESIS_BATCH, Precision


def synthesize_command(
    model: Annotated[str | None, typer.Argument(help=f"The model to synthesise images from (its backbone's BatchNorm statistics). "
        f"{TRUST_NOTE}", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Dataset directory: created, or continued when it holds the same "
        "settings.", show_default=False)] = None,
    preset: PresetOption = DEFAULT_PRESET,
    num_images: Annotated[int | None, typer.Option("--num-images", min=2, help="Images wanted in total (more than exist: the rest are appended) "
        "\\[default: preset].")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Image size, a multiple of the model's stride \\[default: the model's, capped "
        "by the preset].")] = None,
    iterations: Annotated[int | None, typer.Option("--iterations", min=1, help="Full-resolution steps per batch \\[default: preset].")] = None,
    low_res_iterations: Annotated[int | None, typer.Option("--low-res-iterations", min=0, help="Half-resolution steps first (0 disables) "
        "\\[default: preset].")] = None,
    batch: Annotated[int, typer.Option("--batch", min=2, help="Images optimised together (BatchNorm statistics need several); one shard "
        "each.")] = SYNTHESIS_BATCH,
    weights: WeightsOption = None,
    info: Annotated[Path | None, typer.Option("--info", help="Only verify and describe an existing dataset directory.")] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.AUTO,
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Generate synthetic training images from MODEL alone (no data), as a shareable dataset.

    Interrupted runs keep their finished shards: run the same command again to continue. A dataset
    is continued only with the settings it was made with (seed, steps, batch, precision...).

    Examples:

      dfbf synthesize yolo11n-pose.pt --out synth/ --preset quick

      dfbf synthesize cifar-resnet56 --weights r56.th --out synth-r56/ --num-images 512

      dfbf synthesize --info synth/
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        from dfbf_cli.cli.tables import manifest_table
        from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

        if info is not None:
            refuse_unused(out=(out is not None, "does not apply to --info, which only describes a dataset."),
                          weights=(weights is not None, "does not apply to --info."))
            if model is not None:
                raise DfbfError("--info describes an existing dataset; give it alone, without MODEL.")
            dataset = SyntheticDataset.open(info)
            dataset.verify()
            ctx.results.print(manifest_table(dataset))
            ctx.emit({"command": "synthesize", "info": str(info), "verified": True, "num_images": dataset.num_images, "manifest": dataset.manifest})
            return
        if model is None or out is None:
            raise DfbfError("Give MODEL and --out DIR (or --info DIR to describe a dataset).")
        from dfbf_cli.api import synthesize

        with ctx.progress() as show:
            dataset = synthesize(model, out, weights=weights, preset=preset, num_images=num_images, imgsz=imgsz, iterations=iterations,
                                 low_res_iterations=low_res_iterations, batch=batch, device=ctx.device, precision=precision, seed=seed,
                                 on_progress=show)
        ctx.results.print(manifest_table(dataset))
        ctx.emit({"command": "synthesize", "out": str(out), "num_images": dataset.num_images, "manifest": dataset.manifest})
