"""One process against two under torchrun on this CPU's 2 cores: the table of docs/scale.md.

    .venv/bin/python benchmarks/scale.py cpu [--work DIR]     # WORK default /tmp/dfbf-scale

Every job is a dfbf command in a fresh process, run twice: alone with OMP_NUM_THREADS=2, and as 2 ranks
(`python -m torch.distributed.run --standalone --nproc-per-node=2 -m dfbf_cli ...`) with OMP_NUM_THREADS=1,
so both use the 2 cores. (1) `dfbf synthesize` of CIFAR ResNet-20 (256 images, batch 32, the balanced
preset's steps) and of yolo11n-pose (32 images, batch 8, 160 px, 50 + 50 steps): wall time, and whether
the two datasets are identical (the shards' sha256 in dataset.json). (2) `dfbf finetune` of ResNet-20
pruned at 0.5 on the 256-image CIFAR set, 30 epochs, the same global batch 32 (split over the ranks):
wall time and top-1 on half B of the dev file; the 1-process run again with --seed 1 shows the noise that
the 2-process result is to be within. (3) `dfbf finetune` of yolo11n-pose pruned at 0.3 on the 32-image
set, 10 epochs, batch 8: wall time and the final feature loss. Run on an otherwise idle machine: the wall times are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import asset, cifar_dev_halves, machine

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset

CPU = torch.device("cpu")
CORES = 2  # this machine's: the 1-process run takes both as threads, the 2 ranks one each
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={CORES}"]
COMMANDS = [shlex.join([".venv/bin/python", "benchmarks/scale.py", *sys.argv[1:]])]


def dfbf(args: list[str], processes: int, out: Path) -> float:
    """``dfbf ARGS`` writing ``out`` (removed first, so nothing is continued), alone or as CORES ranks: its wall seconds.
    A ``--json`` run's result is kept in ``out``.json."""
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    out.with_name(f"{out.stem}.finetune-state.pt").unlink(missing_ok=True)
    launcher, threads = (TORCHRUN if processes > 1 else []), CORES // processes
    COMMANDS.append(f"OMP_NUM_THREADS={threads} " + shlex.join(["python", *launcher, "-m", "dfbf_cli", *args]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *launcher, "-m", "dfbf_cli", *args], check=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)},
                          stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if "--json" in args:
        out.with_name(out.name + ".json").write_text(done.stdout)
    return seconds


def shard_digests(root: Path) -> list[str]:
    return [shard["sha256"] for shard in SyntheticDataset.open(root).manifest["shards"]]


def synthesize(name: str, model: list[str], options: list[str], work: Path) -> tuple[list[str], Path]:
    """Table rows for one synthesis, alone and as CORES ranks; the 1-process dataset."""
    runs = {}
    for processes in (1, CORES):
        out = work / f"synthetic-{Path(model[0]).stem}-{processes}proc"
        runs[processes] = (dfbf(["synthesize", *model, "--out", str(out), *options, "--device", "cpu", "-q"], processes, out), out)
    (alone, single), (ranks, multiple) = runs[1], runs[CORES]
    identical = "identical" if shard_digests(single) == shard_digests(multiple) else "**different**"
    return [f"| synthesize {name} | 1 × {CORES} threads | {alone:.0f} | 1.00 | {SyntheticDataset.open(single).num_images} images |",
            f"| synthesize {name} | {CORES} × 1 thread | {ranks:.0f} | {alone / ranks:.2f} | dataset {identical} to 1 process's |"], single


def finetune(weights: str, synthetic: Path, work: Path) -> list[str]:
    """Table rows for fine-tuning ResNet-20 pruned at 0.5: alone (seeds 0 and 1) and as CORES ranks (seed 0)."""
    pruned = work / "resnet20-p50.safetensors"
    dfbf(["prune", "cifar-resnet20", "--weights", weights, "--ratio", "0.5", "--out", str(pruned), "--device", "cpu", "-q"], 1, pruned)
    _, _, half_b = cifar_dev_halves(work)
    data = load_data(half_b)
    rows, alone = [], None
    for processes, seed in ((1, 0), (CORES, 0), (1, 1)):
        out = work / f"resnet20-p50-ft-{processes}proc-seed{seed}.safetensors"
        seconds = dfbf(["finetune", str(pruned), "--teacher", "cifar-resnet20", "--teacher-weights", weights, "--data", str(synthetic), "--out",
                        str(out), "--epochs", "30", "--batch", "32", "--seed", str(seed), "--device", "cpu", "-q"], processes, out)
        alone = alone or seconds
        top1 = load_model(str(out)).evaluate(data, imgsz=32, batch=500, device=CPU)["top1"]
        threads = f"{CORES} threads" if processes == 1 else "1 thread"
        rows.append(f"| finetune ResNet-20 p0.5, 30 epochs, seed {seed} | {processes} × {threads} | {seconds:.0f} | {alone / seconds:.2f} "
                    f"| top-1 {top1:.2f} % on half B |")
    return rows


def finetune_yolo(synthetic: Path, work: Path) -> list[str]:
    """Table rows for fine-tuning yolo11n-pose pruned at 0.3 on the small synthetic set: alone and as CORES ranks."""
    model = str(asset("models/yolo11n-pose.pt"))
    pruned = work / "yolo11n-pose-p30.pt"
    dfbf(["prune", model, "--ratio", "0.3", "--out", str(pruned), "--device", "cpu", "-q"], 1, pruned)
    rows, alone = [], None
    for processes in (1, CORES):
        out = work / f"yolo11n-pose-p30-ft-{processes}proc.pt"
        seconds = dfbf(["finetune", str(pruned), "--teacher", model, "--data", str(synthetic), "--out", str(out), "--epochs", "10", "--batch", "8",
                        "--device", "cpu", "-q", "--json"], processes, out)
        alone = alone or seconds
        loss = json.loads(out.with_name(out.name + ".json").read_text())["history"][-1]["loss"]
        threads = f"{CORES} threads" if processes == 1 else "1 thread"
        rows.append(f"| finetune yolo11n-pose p0.3, 10 epochs × 4 steps, batch 8 | {processes} × {threads} | {seconds:.0f} | {alone / seconds:.2f} "
                    f"| final feature loss {loss:.4f} |")
    return rows


def cpu(work: Path) -> None:
    weights = str(asset("models/cifar10-resnet20.th"))
    cifar_rows, cifar_set = synthesize("CIFAR ResNet-20", ["cifar-resnet20", "--weights", weights], ["--num-images", "256", "--batch", "32"], work)
    yolo_rows, yolo_set = synthesize("yolo11n-pose", [str(asset("models/yolo11n-pose.pt"))],
                              ["--num-images", "32", "--batch", "8", "--imgsz", "160", "--iterations", "50", "--low-res-iterations", "50"], work)
    rows = cifar_rows + yolo_rows + finetune(weights, cifar_set, work) + finetune_yolo(yolo_set, work)
    print("| job | processes × threads | wall s | speed-up | result |\n|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=["cpu"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dfbf-scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine(CPU)}\n")
    cpu(args.work)
    print("\ncommands:\n\n" + "\n".join(f"    {c}" for c in COMMANDS))


if __name__ == "__main__":
    main()
