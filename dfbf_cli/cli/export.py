"""``dfbf export``: the model in an inference runtime's format, INT8 calibrated on synthetic images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfbf_cli.cli.common import MODEL_HELP, JsonOption, QuietOption, WeightsOption, input_paths, session
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import CALIBRATION_SET_IMAGES, EXPORT_EXTRA, MAX_SEED, ExportFormat, Int8Recipe

FormatOption = Annotated[ExportFormat, typer.Option("--format", help="openvino (a folder) or onnx (a file).", show_default=False)]
Int8Option = Annotated[bool, typer.Option("--int8", help="Quantise weights and activations to 8 bits, calibrated on synthetic images (--synthetic, "
                                          "else a small set made here at the export's size and kept beside it for the next export).")]
RecipeOption = Annotated[Int8Recipe, typer.Option("--int8-recipe", help="OpenVINO INT8: auto tries mixed (NNCF's mixed preset, as Ultralytics), "
                                                  "outputs-fp (the output layers kept in FP) and bias-correction (full instead of fast), and "
                                                  "keeps the one that agrees best with the FP32 model on held-out synthetic images.")]


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
    pip install "dfbf[export]".

    Examples:

      dfbf export yolo11n-pose.pt --format openvino --int8

      dfbf export run/compressed.safetensors --format onnx --int8 --synthetic run/synthetic
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        from dfbf_cli.adapters import load_model
        from dfbf_cli.engine.efficiency import check_imgsz
        from dfbf_cli.engine.export import calibration_path, check_packages, check_target, default_path, export, make_calibration_set
        from dfbf_cli.engine.files import Kind, Output, check_outputs
        from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

        if synthetic is not None and not int8:
            raise DfbfError("--synthetic is read for INT8 calibration only; add --int8 or leave it out.")
        if recipe != Int8Recipe.AUTO and not (int8 and fmt == ExportFormat.OPENVINO):
            raise DfbfError("--int8-recipe chooses how NNCF quantises an OpenVINO export: it needs --int8 --format openvino.")
        check_packages(fmt)
        adapter = load_model(model, weights)
        size = imgsz or adapter.input_spec.imgsz
        check_imgsz(adapter, size, 1, ctx.device, training=False)
        path = out or default_path(adapter.stem, fmt, int8)
        made = calibration_path(path, adapter.stem, size) if int8 and synthetic is None else None
        check_outputs([Output("--out", path, Kind.DIRECTORY if fmt == ExportFormat.OPENVINO else Kind.FILE)]
                      + ([Output("the calibration set", made, Kind.DIRECTORY)] if made else []),
                      input_paths(model=model, weights=weights, synthetic=synthetic))
        adapter.check_export_path(path, fmt)
        check_target(path)
        dataset = None
        if made is not None:
            ctx.say(f"No --synthetic given: synthesising {CALIBRATION_SET_IMAGES} calibration images at {size} px into {made} on {ctx.device} "
                    "(kept: the next export of this model at this size reuses them).")
            with ctx.progress() as show:
                dataset = make_calibration_set(adapter, made, imgsz=size, device=ctx.device, seed=seed, on_progress=show)
        elif synthetic is not None:
            dataset = SyntheticDataset.open(synthetic)
            dataset.verify()
            if dataset.num_images < 1:
                raise DfbfError(f"{synthetic} holds no images to calibrate on.")
            dataset.check_teacher(adapter.fingerprint(), allow_mismatch=allow_teacher_mismatch, lineage=adapter.lineage())
        ctx.say(f"Exporting {adapter.describe()} to {fmt}{' INT8' if int8 else ''} at {size} px"
                + (f", calibrated on synthetic images from {dataset.root}." if dataset else "."))
        with ctx.progress() as show:
            record = export(adapter, fmt, path, imgsz=size, calibration=dataset, recipe=recipe, on_progress=show)
        quantised = record.get("int8")
        if quantised:
            ctx.say(int8_summary(quantised))
        ctx.say(f"Exported to {path}. Score it with: dfbf eval {path} --data DATA")
        ctx.emit({"command": "export", "out": str(path), "format": str(fmt), "int8": int8, "imgsz": size, "extra": EXPORT_EXTRA,
                  "calibration": record["calibration"], "int8_recipe": quantised})


def int8_summary(quantised: dict) -> str:
    """One sentence: the recipe kept, what stayed in FP, and its agreement with FP32 on held-out images."""
    metric, scores = quantised["agreement_metric"], quantised["agreement"]
    tried = ", ".join(f"{recipe} {values[metric]:.4g}" for recipe, values in scores.items() if metric in values)
    how = f"INT8 by the {quantised['recipe']} recipe" if quantised["recipe"] else "INT8"
    how += f", {len(quantised['kept_fp'])} operation(s) kept in FP"
    if not tried:
        return f"{how} (too few calibration images to hold any out for measuring agreement)."
    return f"{how}; {metric} with the FP32 model on {quantised['held_out_images']} held-out synthetic image(s): {tried}."
