"""Fine-tuning knobs and pruning scope, on a fixed synthetic set: the figures behind finetune.md's defaults.

    .venv/bin/python benchmarks/finetune_knobs.py yolo SYNTHETIC_DIR [EPOCHS]   # yolo11n-pose (30 epochs: ≈2.5 min a row here)
    .venv/bin/python benchmarks/finetune_knobs.py cifar SYNTHETIC_DIR [EPOCHS]  # ResNet-56 at 0.5 (30 epochs: ≈2.5 min a row)

SYNTHETIC_DIR: a synthetic dataset of that model, e.g. the run directory's synthetic/ left by
benchmarks/recovery.py. Each row prunes the original (one-shot L1), fine-tunes it with the settings
shown and scores it (YOLO: pose / box mAP50-95 on coco-mini-pose at 640 px; CIFAR: top-1 on half B of
the dev file, as recovery.py). YOLO rows also vary the pruning scope: the ratio of block-internal
channel groups and of the groups at layer outputs, the interfaces between layers (the YOLO adapter
names those ``model.i.out``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from common import asset, cifar_dev_halves, machine, private_copy, pruned_with_ratios

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.efficiency import gflops
from dfbf_cli.engine.finetune import finetune
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import FinetuneSettings, Scope

CPU = torch.device("cpu")
# (internal ratio, interface ratio, changes to the fine-tuning defaults); finetune.md's weight-decay
# table was measured before CutMix became a default, hence NO_MIX on its rows
NO_MIX = {"cutmix": False}
YOLO_ROWS = [
    (0.3, 0.3, NO_MIX | {"weight_decay": 5e-4}), (0.3, 0.3, NO_MIX), (0.3, 0.3, NO_MIX | {"bn": "frozen", "lr": 1e-4}),
    (0.3, 0.1, NO_MIX | {"weight_decay": 5e-4}), (0.3, 0.1, NO_MIX), (0.3, 0.1, NO_MIX | {"lr": 1e-4}), (0.3, 0.1, NO_MIX | {"bn": "frozen"}),
    (0.3, 0.1, NO_MIX | {"bn": "frozen", "lr": 1e-4}), (0.3, 0.0, NO_MIX), (0.0, 0.0, NO_MIX), (0.3, 0.3, {}),
]
CIFAR_ROWS = [
    (0.5, 0.5, NO_MIX | {"weight_decay": 5e-4}), (0.5, 0.5, NO_MIX), (0.5, 0.5, NO_MIX | {"lr": 3e-3}),
    (0.5, 0.5, NO_MIX | {"bn": "frozen", "lr": 1e-4}), (0.5, 0.5, {}),
]


def main(kind: str, synthetic: Path, epochs: int) -> None:
    if kind == "yolo":
        original, rows, size = load_model(str(asset("models/yolo11n-pose.pt"))), YOLO_ROWS, 640
        data, shown = load_data(private_copy("coco-mini-pose")), ("pose_map50_95", "box_map50_95")
    else:
        original, rows, size = load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th"))), CIFAR_ROWS, 32
        data, shown = load_data(cifar_dev_halves(Path(tempfile.mkdtemp()))[2]), ("top1",)
    dataset = SyntheticDataset.open(synthetic)
    dataset.check_teacher(original.fingerprint(), allow_mismatch=False)
    images, _ = dataset.load()
    example, base = torch.zeros(1, 3, size, size), gflops(original.model, torch.zeros(1, 3, size, size))
    print(f"machine: {machine(CPU)}; {len(images)} synthetic images of {images.shape[-1]} px; {epochs} epochs, batch 32, seed 0\n")
    print(f"| internal ratio | interface ratio | GFLOPs | fine-tuning (differences from the defaults) | {' / '.join(shown)} before | after | time |")
    print("|---|---|---|---|---|---|---|")
    for internal, interface, changes in rows:
        student = pruned_with_ratios(original, lambda g: interface if g.name.endswith(".out") else internal)  # noqa: B023 (used at once)
        before = student.evaluate(data, imgsz=size, batch=16, device=CPU)
        start = time.perf_counter()
        finetune(student, original, images, settings=FinetuneSettings(epochs=epochs, **changes), scope=Scope.BACKBONE, device=CPU, seed=0,
                 state_path=Path(tempfile.mkdtemp()) / "state.pt")
        seconds = time.perf_counter() - start
        after = student.evaluate(data, imgsz=size, batch=16, device=CPU)
        cells = lambda m: " / ".join(f"{m[k]:.3f}" if k.endswith("95") else f"{m[k]:.2f}" for k in shown)  # noqa: E731
        print(f"| {internal} | {interface} | {gflops(student.model, example) / base - 1:+.1%} | {changes or 'defaults'} "
              f"| {cells(before)} | {cells(after)} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 30)
