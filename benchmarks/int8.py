"""INT8 export calibrated on dfbf's synthetic images, against other calibration sets: the tables of docs/export.md.

    .venv/bin/python benchmarks/int8.py yolo [--compressed RUN/compressed.pt] [--synthetic DIR] [--work DIR]
    .venv/bin/python benchmarks/int8.py cifar [--compressed RUN/compressed.safetensors] [--synthetic DIR] [--work DIR]

Each model (the original, and a compressed one if given) is scored as FP32 PyTorch, FP32 in each runtime
format, and INT8 calibrated on (a) a dfbf synthetic set of the ORIGINAL model (--synthetic, e.g. a compress
run's RUN/synthetic; else made here with `dfbf synthesize`, balanced preset), (a2) the same set cut to as
many images as (b) has, where that is fewer, (b) real images, (c) Gaussian noise (mean 0.5, std 0.25,
clipped, seeded) as many as (a), for YOLO (d) Ultralytics' own fallback, coco8-pose's 4 validation images, and
(e) the set `dfbf export --int8` makes itself without --synthetic (the whole command timed). OpenVINO INT8 of
(a), (b) and (e) is made with each recipe, its agreement with FP32 on the set's held-out quarter beside it.
Every set is a synthetic-dataset folder, so one code path (dfbf_cli.engine.export.export) serves them all.
YOLO: yolo11n-pose on coco-mini-pose at 640 px, OpenVINO; its real set is coco-mini-pose's own 28
images, the evaluation images themselves, so (b) is optimistic. CIFAR: ResNet-56, OpenVINO and ONNX; real
calibration on 300 images of half A of the dev file, every variant scored on half B. Each variant is
timed on its own (median CPU latency, batch 1): interleaved with other runtimes' thread pools, PyTorch's
2-core latency read up to 20× too high. Run on an otherwise idle machine: latencies and
export times are part of the result. WORK (--work, default /tmp/dfbf-int8) keeps the synthetic sets and exports.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from common import PARETO_RESULTS, append_point, as_uint8, asset, cifar_dev_halves, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import EvalData, ModelAdapter
from dfbf_cli.engine.efficiency import Efficiency, measure_efficiency
from dfbf_cli.engine.export import calibration_images, default_path, export
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import INT8_CANDIDATES, ExportFormat, Int8Recipe

CPU = torch.device("cpu")
RUNS = 30
COMMANDS = [shlex.join([".venv/bin/python", "benchmarks/int8.py", *sys.argv[1:]])]
FORMATS = {ExportFormat.OPENVINO: "OpenVINO", ExportFormat.ONNX: "ONNX"}


@dataclass(frozen=True)
class Variant:
    model: str
    precision: str  # "FP32 PyTorch", "INT8 OpenVINO"...
    calibration: str  # a key of the calibration sets ("a", "b"...) or "" for none
    adapter: ModelAdapter
    export_s: float | None
    recipe: str = ""  # the INT8 recipe ("" for FP32)
    agreement: float | None = None  # with the FP32 model on the set's held-out images (the primary metric's agreement)
    chosen: bool = False  # the recipe --int8-recipe auto keeps for this set


def dfbf(*args: str) -> None:
    """A dfbf command in a fresh process, as a user runs it (and recorded for the report)."""
    COMMANDS.append(shlex.join(["dfbf", *args]))
    subprocess.run([sys.executable, "-m", "dfbf_cli", *args], check=True)


def synthetic_set(model: list[str], given: Path | None, out: Path) -> SyntheticDataset:
    """The original model's synthetic set: the one given, else made (or continued) at ``out``."""
    if given is None:
        dfbf("synthesize", *model, "--out", str(out), "--device", "cpu", "-q")
    dataset = SyntheticDataset.open(given or out)
    dataset.verify()
    return dataset


def image_set(root: Path, adapter: ModelAdapter, images: torch.Tensor) -> SyntheticDataset:
    """Any uint8 N×3×S×S images as a one-shard dataset of ``adapter``'s own, for the export's calibration."""
    shutil.rmtree(root, ignore_errors=True)
    teacher = {"name": adapter.name, "family": adapter.family, "task": adapter.task, "fingerprint": adapter.fingerprint()}
    dataset = SyntheticDataset.create_or_resume(root, teacher=teacher, input_spec=adapter.input_spec.to_dict(), imgsz=images.shape[-1],
                                                generation={"calibration": root.name})
    dataset.add_shard(images.contiguous(), None, {})
    return dataset


def own_set(model: list[str], stem: str, folder: Path) -> tuple[SyntheticDataset, float]:
    """(e): the set `dfbf export --int8` makes itself when given no --synthetic, and the wall time of that
    whole command (synthesis, the recipes, the export), run as a user runs it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    dfbf("export", *model, "--format", "openvino", "--int8", "--device", "cpu", "--out", str(folder / f"{stem}_int8_openvino_model"), "-q")
    seconds = time.perf_counter() - start
    return SyntheticDataset.open(next(folder.glob("*-synthetic-*px*"))), seconds


def gaussian_noise(like: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(like.shape, generator=torch.Generator().manual_seed(0)) * 0.25 + 0.5
    return (noise.clamp(0, 1) * 255).round().to(torch.uint8)


def calibration_sets(adapter: ModelAdapter, synthetic: SyntheticDataset, real: torch.Tensor, extra: torch.Tensor | None,
                     folder: Path) -> dict[str, SyntheticDataset]:
    """(a) the original's synthetic set (accepted as a pruned model's own, as `dfbf export` accepts it),
    (a2) it cut to len(real) images where fewer, (b) real, (c) noise, (d) ``extra`` (Ultralytics' fallback)."""
    synthetic.check_teacher(adapter.fingerprint(), allow_mismatch=False, lineage=adapter.lineage())
    used = calibration_images(synthetic)
    sets = {"a": synthetic}
    if len(real) < len(used):
        sets["a2"] = image_set(folder / "synthetic-cut", adapter, calibration_images(synthetic, len(real)))
    sets["b"] = image_set(folder / "real", adapter, real)
    sets["c"] = image_set(folder / "noise", adapter, gaussian_noise(used))
    if extra is not None:
        sets["d"] = image_set(folder / "ultralytics-fallback", adapter, extra)
    return sets


def variants(label: str, adapter: ModelAdapter, sets: dict[str, SyntheticDataset], formats: list[ExportFormat], imgsz: int,
             folder: Path, every_recipe: set[str]) -> list[Variant]:
    """The model in PyTorch, then exported FP32 and INT8 (one per calibration set; OpenVINO: one per recipe for the
    sets in ``every_recipe``) to each format, timed. Each INT8 export holds out a quarter of its set and records
    its agreement with FP32 there: what --int8-recipe auto chooses by."""
    rows = [Variant(label, "FP32 PyTorch", "", adapter, None)]
    for fmt in formats:
        for key, dataset in {"": None, **sets}.items():
            recipes = [Int8Recipe.MIXED] if dataset is None or fmt != ExportFormat.OPENVINO or key not in every_recipe else list(INT8_CANDIDATES)
            made = []
            for recipe in recipes:
                start = time.perf_counter()
                name = f"{key or 'fp32'}-{recipe}" if dataset is not None else "fp32"
                record = export(adapter, fmt, folder / default_path(name, fmt, dataset is not None), imgsz=imgsz, calibration=dataset, recipe=recipe)
                seconds, precision = time.perf_counter() - start, f"{'INT8' if dataset else 'FP32'} {FORMATS[fmt]}"
                quantised = record.get("int8") or {}
                agreement = (quantised.get("agreement") or {}).get(str(recipe), {}).get(quantised.get("agreement_metric", ""))
                made.append(Variant(label, precision, key, load_model(str(folder / default_path(name, fmt, dataset is not None))), seconds,
                                    str(recipe) if dataset is not None else "", agreement))
            best = max(range(len(made)), key=lambda i: made[i].agreement if made[i].agreement is not None else -1.0)  # first of equals
            rows += [replace(v, chosen=i == best and len(made) > 1) for i, v in enumerate(made)]
    return rows


def report(rows: list[Variant], sets: dict[str, str], metrics: dict[str, str], data: EvalData, *, imgsz: int, batch: int,
           scale: float) -> list[tuple[Variant, dict[str, float], Efficiency]]:
    """Score and time every variant, print the table and the targets; each variant with its scores and costs."""
    scores = [v.adapter.evaluate(data, imgsz=imgsz, batch=batch, device=CPU) for v in rows]
    # one variant at a time: timed round-robin, one runtime's idle threads slow the next (2 cores: up to 20× for PyTorch)
    efficiency = [measure_efficiency([(v.adapter, imgsz)], device=CPU, runs=RUNS)[0] for v in rows]
    print(f"| model | precision / format | calibration | recipe | held-out agreement | {' | '.join(metrics.values())} | median CPU latency ms "
          "| file MB | export s |")
    print("|---|---|---|---|---|" + "---|" * len(metrics) + "---|---|---|")
    for v, score, cost in zip(rows, scores, efficiency):
        cells = " | ".join(f"{score[key] * scale:.2f}" for key in metrics)
        export_s = "—" if v.export_s is None else f"{v.export_s:.0f}"
        recipe = (f"**{v.recipe}** (auto)" if v.chosen else v.recipe) or "—"
        agreement = "—" if v.agreement is None else f"{v.agreement:.4f}"
        print(f"| {v.model} | {v.precision} | {sets.get(v.calibration, '—')} | {recipe} | {agreement} | {cells} | {cost.latency_cpu_ms:.1f} "
              f"| {cost.file_mb:.1f} | {export_s} |")
    primary = next(iter(metrics))
    print(f"\nTargets ({metrics[primary]}, INT8 OpenVINO): synthetic within 1.0 point of real calibration; more than "
          "1.0 point above noise; INT8 (synthetic) at least 2× faster than FP32 PyTorch.\n")
    for model in dict.fromkeys(v.model for v in rows):
        mine = [(v, s, c) for v, s, c in zip(rows, scores, efficiency) if v.model == model]
        point = {v.calibration: s[primary] * scale for v, s, _ in mine if v.precision == "INT8 OpenVINO" and v.recipe == Int8Recipe.MIXED}
        int8_ms = next(c.latency_cpu_ms for v, _, c in mine if v.precision == "INT8 OpenVINO" and v.calibration == "a")
        speedup = next(c.latency_cpu_ms for v, _, c in mine if v.precision == "FP32 PyTorch") / int8_ms
        print(f"- {model}: synthetic {point['a']:.1f} vs real {point['b']:.1f}: {'met' if abs(point['a'] - point['b']) <= 1.0 else 'NOT met'}; "
              f"vs noise {point['c']:.1f}: {'met' if point['a'] - point['c'] > 1.0 else 'NOT met'}; "
              f"{speedup:.1f}× faster than FP32 PyTorch: {'met' if speedup >= 2.0 else 'NOT met'}")
    return list(zip(rows, scores, efficiency))


def pareto_points(measured: list[tuple[Variant, dict[str, float], Efficiency]], results: Path) -> None:
    """The dfbf-calibrated INT8 OpenVINO rows as points of benchmarks/pareto.py's pose plot, their latency
    beside the original's FP32 PyTorch time in this process."""
    original_ms = next(c.latency_cpu_ms for v, _, c in measured if v.precision == "FP32 PyTorch")
    for v, score, cost in measured:
        if v.precision == "INT8 OpenVINO" and v.calibration == "a" and v.recipe == Int8Recipe.MIXED:
            append_point(results, {"case": "pose", "kind": "int8", "imgsz": 640, "model": v.model, "gflops": cost.gflops,
                                   "latency_ms": cost.latency_cpu_ms, "latency_original_ms": original_ms, "pose_map50_95": score["pose_map50_95"],
                                   "box_map50_95": score["box_map50_95"], "command": COMMANDS[0]}, CPU)


def labels(used: int, real: int, real_what: str, fallback: int | None, own: SyntheticDataset, own_s: float) -> dict[str, str]:
    names = {"a": f"(a) dfbf synthetic, {used}", "a2": f"(a2) dfbf synthetic, {real}", "b": f"(b) {real_what}, {real}",
             "c": f"(c) Gaussian noise, {used}",
             "e": f"(e) made by `dfbf export --int8` itself, {own.num_images} at {own.manifest['imgsz']} px (whole command {own_s / 60:.1f} min)"}
    return names | ({"d": f"(d) Ultralytics' fallback: coco8-pose val, {fallback}"} if fallback else {})


def yolo(work: Path, compressed: Path | None, given: Path | None, results: Path) -> None:
    original = str(asset("models/yolo11n-pose.pt"))
    synthetic = synthetic_set([original], given, work / "synthetic")
    data = private_copy("coco-mini-pose")
    real = as_uint8(load_data(data.parent / "images" / "val"), 640)
    fallback = as_uint8(load_data(private_copy("coco8-pose").parent / "images" / "val"), 640)
    own, own_s = own_set([original], "yolo11n-pose", work / "own")
    models = [("yolo11n-pose", original)] + ([(f"{compressed.parent.name}/{compressed.name}", str(compressed))] if compressed else [])
    rows: list[Variant] = []
    for label, path in models:
        adapter = load_model(path)
        folder = work / "exports" / label.replace("/", "-")
        sets = calibration_sets(adapter, synthetic, real, fallback, folder / "calibration") | {"e": own}
        rows += variants(label, adapter, sets, [ExportFormat.OPENVINO], 640, folder, every_recipe={"a", "b", "e"})
        COMMANDS.append(f"dfbf export {path} --format openvino --int8 --synthetic {synthetic.root} --imgsz 640")
    used = len(calibration_images(synthetic))
    names = labels(used, len(real), "real: coco-mini-pose, the evaluation images themselves (optimistic)", len(fallback), own, own_s)
    measured = report(rows, names, {"pose_map50_95": "pose mAP50-95 ×100", "box_map50_95": "box mAP50-95 ×100"}, load_data(data),
                      imgsz=640, batch=16, scale=100.0)
    pareto_points(measured, results)


def cifar(work: Path, compressed: Path | None, given: Path | None) -> None:
    weights = str(asset("models/cifar10-resnet56.th"))
    synthetic = synthetic_set(["cifar-resnet56", "--weights", weights], given, work / "synthetic-cifar")
    x, half_a, half_b = cifar_dev_halves(work)
    real = torch.from_numpy(x[np.random.default_rng(0).choice(half_a, 300, replace=False)]).permute(0, 3, 1, 2).contiguous()
    own, own_s = own_set(["cifar-resnet56", "--weights", weights], "resnet56", work / "own-cifar")
    models: list[tuple[str, str, str | None]] = [("ResNet-56", "cifar-resnet56", weights)]
    if compressed:
        models.append((f"{compressed.parent.name}/{compressed.name}", str(compressed), None))
    rows: list[Variant] = []
    for label, spec, spec_weights in models:
        adapter = load_model(spec, spec_weights)
        folder = work / "exports-cifar" / label.replace("/", "-")
        sets = calibration_sets(adapter, synthetic, real, None, folder / "calibration") | {"e": own}
        rows += variants(label, adapter, sets, list(FORMATS), 32, folder, every_recipe={"a", "b", "e"})
        COMMANDS.append(f"dfbf export {spec}{f' --weights {spec_weights}' if spec_weights else ''} --format openvino --int8 --synthetic {synthetic.root}")
    names = labels(len(calibration_images(synthetic)), len(real), "real: half A of the dev file", None, own, own_s)
    report(rows, names, {"top1": "top-1 % (half B)"}, load_data(half_b), imgsz=32, batch=500, scale=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=["yolo", "cifar"])
    parser.add_argument("--compressed", type=Path, help="a compressed model to add (RUN/compressed.pt or RUN/compressed.safetensors)")
    parser.add_argument("--synthetic", type=Path, help="a synthetic set of the ORIGINAL model (default: made in WORK)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dfbf-int8"))
    parser.add_argument("--results", type=Path, default=PARETO_RESULTS, help="yolo: pareto.py's results file")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine(CPU)}\n")
    if args.case == "yolo":
        yolo(args.work, args.compressed, args.synthetic, args.results)
    else:
        cifar(args.work, args.compressed, args.synthetic)
    print("\ncommands:\n\n" + "\n".join(f"    {c}" for c in COMMANDS))


if __name__ == "__main__":
    main()
