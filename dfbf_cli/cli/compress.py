"""``dfbf compress``: synthesize, prune, fine-tune and evaluate in one resumable run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from dfbf_cli.adapters import load_model
from dfbf_cli.cli.common import DeviceOption, JsonOption, PrecisionOption, QuietOption, SeedOption, WeightsOption, session
from dfbf_cli.cli.evaluate import report_table
from dfbf_cli.cli.finetune import AllowMismatchOption, run_finetune
from dfbf_cli.cli.prune import pruned_model
from dfbf_cli.cli.synthesize import run_synthesis_with_progress
from dfbf_cli.engine.compress import STAGES, RunDirectory, metric_drop, write_report
from dfbf_cli.engine.data import ImageFolder, load_eval_data
from dfbf_cli.engine.evaluate import evaluate_models
from dfbf_cli.engine.finetune import EpochRecord, FinetuneSettings
from dfbf_cli.engine.presets import DEFAULT_PRESET, PRESETS
from dfbf_cli.engine.progressive import ProgressiveSettings, check_strategy
from dfbf_cli.engine.pruning import PruneSettings, require_ratio
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.engine.synthesis import plan_synthesis
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.errors import DfbfError, QualityGateFailed

HISTORY = "finetune-history.json"


def compress_command(
    model: Annotated[str, typer.Argument(help="The trained model to compress (YOLO .pt, torchvision:NAME, cifar-resnetN).", show_default=False)],
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of each prunable backbone layer's channels to remove, 0 < R < 1.", show_default=False)],
    data: Annotated[str | None, typer.Option("--data", help="Labelled data to score original, pruned and compressed models; or a folder of real photos (agreement with the original).")] = None,
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="Reuse this synthetic dataset (from 'dfbf synthesize') instead of making one in the run directory.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory; re-running the same command there resumes it \\[default: NAME-compressed/].", show_default=False)] = None,
    preset: Annotated[str, typer.Option("--preset", help="Budget: quick (minutes), balanced, paper (the reference settings: slow).")] = DEFAULT_PRESET,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Exit 1 if the task metric drops by more than this (in its own units: mAP 0-1, top-1 percent).")] = None,
    criterion: Annotated[str, typer.Option("--criterion", help="Channel importance: l1 or bn.")] = "l1",
    schedule: Annotated[str, typer.Option("--schedule", help="uniform or layer-dependent.")] = "uniform",
    strategy: Annotated[str, typer.Option("--strategy", help="oneshot, or progressive (Paoding-style, scored on the synthetic images).")] = "oneshot",
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Fine-tuning epochs \\[default: the preset's optimiser steps over the synthetic set].")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Synthesis and fine-tuning image size \\[default: the model's, capped by the preset].")] = None,
    allow_teacher_mismatch: AllowMismatchOption = False,
    weights: WeightsOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Make MODEL smaller and faster without its training data: synthesize → prune → fine-tune → evaluate.

    Writes a run directory with the compressed model, the pruned-only model, report.json, report.md
    and report.png. Interrupted? Run the same command again: finished stages are kept.

    Examples:

      dfbf compress yolov8n-pose.pt --ratio 0.3 --data coco8-pose/data.yaml

      dfbf compress cifar-resnet56 --weights r56.th --ratio 0.5 --data test.npz --max-drop 1.5
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        require_ratio(ratio)
        if preset not in PRESETS:
            raise DfbfError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
        if max_drop is not None and not max_drop >= 0:
            raise DfbfError(f"--max-drop must be 0 or more, got {max_drop}.")
        chosen = PRESETS[preset]
        prune_settings = PruneSettings(ratio, criterion, schedule)
        prune_settings.validate()
        check_strategy(strategy)
        eval_data = load_eval_data(data) if data else None
        original = load_model(model, weights)
        size = imgsz or chosen.imgsz(original.input_spec.imgsz)
        fingerprint = original.fingerprint()
        dataset = None
        if synthetic is not None:
            dataset = SyntheticDataset.open(synthetic)
            dataset.verify()
            dataset.check_teacher(fingerprint, allow_mismatch=allow_teacher_mismatch)
        num_images = dataset.num_images if dataset else chosen.num_images(size)
        arithmetic = resolve_precision(precision, ctx.device)  # bf16 or fp32: what the reports say was used
        finetune_settings = FinetuneSettings(epochs=epochs or chosen.epochs(num_images, FinetuneSettings.batch, dataset.imgsz if dataset else size),
                                             precision=arithmetic)
        finetune_settings.validate()
        request = {"model": model, "fingerprint": fingerprint, "ratio": ratio, "preset": preset, "criterion": criterion,
                   "schedule": schedule, "strategy": strategy, "epochs": finetune_settings.epochs, "precision": precision, "imgsz": size, "seed": seed,
                   "synthetic": None if synthetic is None else str(synthetic.resolve()), "data": data}
        run = RunDirectory.prepare(out or Path(f"{Path(original.name.split(':')[-1]).stem}-compressed"), original.default_suffix, request)

        if dataset is None:
            plan = plan_synthesis(original, run.synthetic, num_images=num_images, imgsz=size, batch=32,
                                  settings=chosen.synthesis, seed=seed)
            dataset = run_synthesis_with_progress(ctx, original, plan, arithmetic)

        if run.pruned.exists():
            pruned = original.reload(run.pruned)
        else:
            progressive = ProgressiveSettings()
            probe = dataset.probe(progressive.probe_images) if strategy == "progressive" else None
            pruned, _ = pruned_model(ctx, original, prune_settings, strategy, probe, progressive, seed)
            pruned.save(run.pruned)

        history_file = run.root / HISTORY
        if run.compressed.exists() and history_file.exists():
            compressed = original.reload(run.compressed)
            history = [EpochRecord(**r) for r in json.loads(history_file.read_text())]
        else:
            compressed = original.reload(run.pruned)
            with ctx.progress() as progress:
                history = run_finetune(ctx, progress, compressed, original, dataset, settings=finetune_settings,
                                       seed=seed, state_path=run.finetune_state, resume=True)
            compressed.save(run.compressed)
            history_file.write_text(json.dumps([vars(r) for r in history], indent=2))
            run.finetune_state.unlink(missing_ok=True)

        reports = None
        if eval_data is not None:
            if not quiet:
                ctx.console.print(f"Evaluating original, pruned and compressed models on {data} ...", highlight=False)
            teacher = original if isinstance(eval_data, ImageFolder) else None
            evaluated = evaluate_models([original, pruned, compressed], eval_data, teacher=teacher, imgsz=None,
                                        batch=16, device=ctx.device)
            reports = {stage: replace(report, name=stage) for stage, report in zip(STAGES, evaluated)}
        summary = write_report(run, request, reports, history, precision=arithmetic)
        if reports:
            ctx.console.print(report_table(list(reports.values()), f"dfbf compress · {model} · ratio {ratio}"))
        ctx.console.print(f"Run directory: {run.root} (compressed model: {run.compressed})", highlight=False)
        ctx.emit({"command": "compress", "run_dir": str(run.root), **summary})
        drop = metric_drop(reports) if reports else None
        if max_drop is not None:
            if drop is None:
                raise DfbfError("--max-drop needs --data with labels or photos to measure the metric on.")
            if drop[1] > max_drop:
                raise QualityGateFailed(f"{drop[0]} dropped by {drop[1]:.4g}, more than --max-drop {max_drop}.")
