"""Issue 15's levers on yolo11n-pose, one synthetic set, the same 3,200 fine-tuning steps: the lever table of docs/pareto.md.

    .venv/bin/python benchmarks/levers.py --synthetic DIR --ratio 0.3                                  # backbone, one-shot
    .venv/bin/python benchmarks/levers.py --synthetic DIR --ratio 0.3 --rounds 4                       # 4 prune → distil rounds
    .venv/bin/python benchmarks/levers.py --synthetic DIR --flops 0.878 --allocation sensitivity       # the same GFLOPs, allocated
    .venv/bin/python benchmarks/levers.py --synthetic DIR --flops 0.876 --scope trunk                  # backbone + neck

DIR is a synthetic set of yolo11n-pose (`dfbf synthesize yolo11n-pose.pt --out DIR --seed 0`: balanced preset,
128 images at 320 px). The engine's own functions, without `dfbf compress`'s holdout, so that every lever
trains on the same 128 images: prune (plan_keep: L1, the allocation's per-group counts), distil with the
balanced preset (800 epochs, bf16, split evenly over --rounds; each round's cut is round_keep's step), then
score on coco-mini-pose at 640 px (and 576, 512) and time it interleaved with the original at 640 px. The
result is a dfbf point of benchmarks/pareto.py's results file (--results), which its report tables and plots.
Fine-tuning checkpoints go to --work: an interrupted run resumes, a finished one is only scored again.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from common import PARETO_RESULTS, append_point, asset, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.compress import round_keep
from dfbf_cli.engine.efficiency import measure_efficiency
from dfbf_cli.engine.finetune import finetune
from dfbf_cli.engine.pruning import choose, plan_keep, prune
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import PRESETS, Allocation, FinetuneSettings, Precision, PresetName, PruneSettings, Scope

CPU = torch.device("cpu")
PROBE_IMAGES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", type=Path, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float)
    target.add_argument("--flops", type=float)
    parser.add_argument("--allocation", choices=[a.value for a in Allocation], default=Allocation.UNIFORM.value)
    parser.add_argument("--scope", choices=[s.value for s in Scope], default=Scope.BACKBONE.value)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, help="in all (default: the balanced preset's 3,200 steps over the set)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dfbf-levers"))
    parser.add_argument("--results", type=Path, default=PARETO_RESULTS)
    args = parser.parse_args()
    tag = (f"{args.scope}-{'ratio' if args.ratio is not None else 'flops'}{args.ratio or args.flops:g}-{args.allocation}"
           f"-r{args.rounds}-{args.synthetic.name}")
    args.work.mkdir(parents=True, exist_ok=True)

    original, dataset = load_model(str(asset("models/yolo11n-pose.pt"))), SyntheticDataset.open(args.synthetic)
    dataset.verify()
    images, _ = dataset.load()
    settings = PruneSettings(args.ratio, flops=args.flops, scope=Scope(args.scope), allocation=Allocation(args.allocation))
    probe = dataset.probe(PROBE_IMAGES) if settings.allocation is Allocation.SENSITIVITY else None
    keep = plan_keep(original, settings, imgsz=original.input_spec.imgsz, probe=probe, device=CPU)
    sizes = {g.name: g.size for g in original.channel_groups(settings.scope)}
    epochs = args.epochs or PRESETS[PresetName.BALANCED].epochs(len(images), FinetuneSettings.batch, dataset.imgsz)
    finetuning = FinetuneSettings(epochs=math.ceil(epochs / args.rounds), precision=Precision.BF16)
    student, start = original, time.perf_counter()
    for k in range(1, args.rounds + 1):
        student = prune(student, settings, choose(student, settings, round_keep(sizes, keep, k, args.rounds)))[0]
        history = finetune(student, original, images, settings=finetuning, scope=settings.scope, device=CPU, seed=k - 1,
                           state_path=args.work / f"{tag}.round{k}.state.pt", data_id=dataset.content_id(), resume=True)
    minutes = (time.perf_counter() - start) / 60
    student.save(args.work / f"{tag}.pt")

    data = load_data(private_copy("coco-mini-pose"))
    scores = {size: student.evaluate(data, imgsz=size, batch=16, device=CPU) for size in (640, 576, 512)}
    before, after = measure_efficiency([(original, 640), (student, 640)], device=CPU, runs=30)
    point = {"case": "pose", "kind": "dfbf", "imgsz": 640, "flops_target": args.flops, "ratio": args.ratio, "scope": args.scope,
             "allocation": args.allocation, "rounds": args.rounds, "seed": 0, "extra": [], "via": f"levers.py, {args.synthetic.name}",
             "gflops": after.gflops, "gflops_original": before.gflops, "latency_ms": after.latency_cpu_ms, "latency_original_ms": before.latency_cpu_ms,
             "pose_map50_95": scores[640]["pose_map50_95"], "box_map50_95": scores[640]["box_map50_95"], "loss": history[-1].loss,
             "finetune_min": minutes, "smaller_inputs": {size: [scores[size]["pose_map50_95"], scores[size]["box_map50_95"]] for size in (576, 512)},
             "command": shlex.join([".venv/bin/python", "benchmarks/levers.py", *sys.argv[1:]])}
    append_point(args.results, point, CPU)


if __name__ == "__main__":
    main()
