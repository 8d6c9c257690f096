"""``dfbf export``: the model in an inference runtime's format, INT8 calibrated on synthetic images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfbf_cli.cli.common import MODEL_HELP, JsonOption, QuietOption, WeightsOption, session
from dfbf_cli.settings import EXPORT_EXTRA, MAX_SEED, ExportFormat, Int8Recipe

FormatOption = Annotated[ExportFormat, typer.Option("--format", help="openvino (a folder) or onnx (a file).", show_default=False)]
Int8Option = Annotated[bool, typer.Option("--int8", help="Quantise weights and activations to 8 bits, calibrated on synthetic images (--synthetic, "
                                          "else a small set made here at the export's size and kept beside it for the next export).")]
RecipeOption = Annotated[Int8Recipe, typer.Option("--int8-recipe", help="OpenVINO INT8: auto tries mixed (NNCF's mixed preset, as Ultralytics), "
                                                  "outputs-fp (the output layers kept in FP) and bias-correction (full instead of fast), and "
                                                  "keeps the one that agrees best with the FP32 model on held-out synthetic images. A pose "
                                                  "model's keypoint branch at the coarsest stride stays in FP in each.")]


def export_command(
    model: Annotated[str, typer.Argument(help=f"The model to export (pruned or not). {MODEL_HELP}", show_default=False)],
    fmt: FormatOption,
    int8: Int8Option = False,
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="Synthetic dataset of this model (from 'dfbf synthesize' or a compress run): "
                                                   "the INT8 calibration images.")] = None,
    recipe: RecipeOption = Int8Recipe.AUTO,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Input size of the export \\[default: the model's].", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (openvino) or file (onnx) \\[default: NAME[_int8]_openvino_model/ or "
                                             "NAME[-int8].onnx here].", show_default=False)] = None,
    allow_teacher_mismatch: Annotated[bool, typer.Option("--allow-teacher-mismatch", help="Calibrate on a --synthetic dataset made from another "
                                                         "model (a pruned model's own original is accepted without it).")] = False,
    weights: WeightsOption = None,
    device: Annotated[str, typer.Option("--device", help="Where to synthesise the calibration set when --int8 makes its own: auto (CUDA when "
                                        "present), cpu, cuda or cuda:N. The export itself runs on the CPU.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seed of the calibration set --int8 makes.")] = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Export MODEL to OpenVINO or ONNX, optionally INT8, without any real calibration data.

    A YOLO export is Ultralytics' own (stock ultralytics.YOLO(path) predicts and validates with it); a
    classifier goes through OpenVINO + NNCF or ONNX Runtime. A quarter of the calibration images is held
    out to measure how well the INT8 model agrees with the FP32 one (and, for OpenVINO, to choose the
    recipe); the export's dfbf.json records it. 'dfbf eval' scores either. Needs the export extra:
    pip install "dfbf\\[export]".

    Examples:

      dfbf export yolo11n-pose.pt --format openvino --int8

      dfbf export run/compressed.safetensors --format onnx --int8 --synthetic run/synthetic
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        from dfbf_cli.api import export

        with ctx.progress() as show:
            done = export(model, fmt, weights=weights, int8=int8, synthetic=synthetic, recipe=recipe, imgsz=imgsz, out=out,
                          allow_teacher_mismatch=allow_teacher_mismatch, device=ctx.device, seed=seed, on_progress=show)
        quantised = done.record.get("int8")
        if quantised:
            ctx.say(int8_summary(quantised))
        ctx.say(f"Exported to {done.path}. Score it with: dfbf eval {done.path} --data DATA")
        ctx.emit({"command": "export", "out": str(done.path), "format": str(fmt), "int8": int8, "imgsz": done.record["imgsz"], "extra": EXPORT_EXTRA,
                  "calibration": done.record["calibration"], "int8_recipe": quantised})


def int8_summary(quantised: dict) -> str:
    """One sentence: the recipe kept, what stayed in FP, and its agreement with FP32 on held-out images."""
    metric, scores = quantised["agreement_metric"], quantised["agreement"]
    tried = ", ".join(f"{recipe} {values[metric]:.4g}" for recipe, values in scores.items() if metric in values)
    how = f"INT8 by the {quantised['recipe']} recipe" if quantised["recipe"] else "INT8"
    how += f", {len(quantised['kept_fp'])} operation(s) kept in FP"
    if not tried:
        return f"{how} (too few calibration images to hold any out for measuring agreement)."
    return f"{how}; {metric} with the FP32 model on {quantised['held_out_images']} held-out synthetic image(s): {tried}."
