"""``dfbf export``: the model in an inference runtime's format, INT8 calibrated on synthetic images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfbf_cli.cli.common import MODEL_HELP, DeviceOption, JsonOption, QuietOption, SeedOption, WeightsOption, input_paths, session
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import CALIBRATION_IMAGES, EXPORT_EXTRA, ExportFormat

FormatOption = Annotated[ExportFormat, typer.Option("--format", help="openvino (a folder) or onnx (a file).", show_default=False)]
Int8Option = Annotated[bool, typer.Option("--int8", help="Quantise weights and activations to 8 bits, calibrated on --synthetic images.")]


def export_command(
    model: Annotated[str, typer.Argument(help=f"The model to export (pruned or not). {MODEL_HELP}", show_default=False)],
    fmt: FormatOption,
    int8: Int8Option = False,
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="Synthetic dataset of this model (from 'dfbf synthesize' or a compress run): "
                                                   "the INT8 calibration images.")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=8, help="Input size of the export \\[default: the model's].", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (openvino) or file (onnx) \\[default: NAME[_int8]_openvino_model/ or "
                                             "NAME[-int8].onnx here].", show_default=False)] = None,
    allow_teacher_mismatch: Annotated[bool, typer.Option("--allow-teacher-mismatch", help="Calibrate on a --synthetic dataset made from another "
                                                         "model (a pruned model's own original is accepted without it).")] = False,
    weights: WeightsOption = None,
    device: DeviceOption = "cpu",
    seed: SeedOption = 0,
    quiet: QuietOption = False,
    json_output: JsonOption = False,
) -> None:
    """Export MODEL to OpenVINO or ONNX, optionally INT8, without any real calibration data.

    A YOLO export is Ultralytics' own (stock ultralytics.YOLO(path) predicts and validates with it); a
    classifier goes through OpenVINO + NNCF or ONNX Runtime. 'dfbf eval' scores either. Needs the
    export extra: pip install "dfbf[export]".

    Examples:

      dfbf export yolo11n-pose.pt --format openvino --int8 --synthetic synth/

      dfbf export run/compressed.safetensors --format onnx --int8 --synthetic run/synthetic
    """
    with session(device=device, seed=seed, quiet=quiet, json_mode=json_output) as ctx:
        from dfbf_cli.adapters import load_model
        from dfbf_cli.engine.efficiency import check_imgsz
        from dfbf_cli.engine.export import check_packages, check_target, default_path, export
        from dfbf_cli.engine.files import Kind, Output, check_outputs
        from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

        if int8 and synthetic is None:
            raise DfbfError("--int8 needs calibration images: pass --synthetic DIR (from 'dfbf synthesize' on this model, or a compress run's).")
        if synthetic is not None and not int8:
            raise DfbfError("--synthetic is read for INT8 calibration only; add --int8 or leave it out.")
        check_packages(fmt)
        adapter = load_model(model, weights)
        size = imgsz or adapter.input_spec.imgsz
        check_imgsz(adapter, size, 1, ctx.device, training=False)
        path = out or default_path(adapter.stem, fmt, int8)
        check_outputs([Output("--out", path, Kind.DIRECTORY if fmt == ExportFormat.OPENVINO else Kind.FILE)],
                      input_paths(model=model, weights=weights, synthetic=synthetic))
        adapter.check_export_path(path, fmt)
        check_target(path)
        dataset = None
        if synthetic is not None:
            dataset = SyntheticDataset.open(synthetic)
            dataset.verify()
            if dataset.num_images < 1:
                raise DfbfError(f"{synthetic} holds no images to calibrate on.")
            dataset.check_teacher(adapter.fingerprint(), allow_mismatch=allow_teacher_mismatch, lineage=adapter.lineage())
        ctx.say(f"Exporting {adapter.describe()} to {fmt}{' INT8' if int8 else ''} at {size} px"
                + (f", calibrated on {min(dataset.num_images, CALIBRATION_IMAGES)} synthetic image(s) from {synthetic}." if dataset else "."))
        written = export(adapter, fmt, path, imgsz=size, calibration=dataset)
        ctx.say(f"Exported to {written}. Score it with: dfbf eval {written} --data DATA")
        ctx.emit({"command": "export", "out": str(written), "format": str(fmt), "int8": int8, "imgsz": size, "extra": EXPORT_EXTRA})
