"""Does compression pay? `dfbf compress` against the free alternative, the original at a smaller input size.

Task metric against GFLOPs and against measured CPU latency; the commands, in order:

    .venv/bin/python benchmarks/pareto.py free pose      # yolo11n-pose at 640, 608, ..., 416 px on coco-mini-pose
    .venv/bin/python benchmarks/pareto.py free person    # yolo11n-person at 640, ..., 416 px on coco-mini-person
    .venv/bin/python benchmarks/pareto.py dfbf pose --flops 0.85 0.75 0.65 0.55     # one synthesis, one compress run per target
    .venv/bin/python benchmarks/pareto.py dfbf person --flops 0.85 0.75 0.65 0.55
    .venv/bin/python benchmarks/pareto.py cifar --seeds 0 1 2     # ResNet-56 at ratio 0.5 per seed, beside the dense ResNet-20
    .venv/bin/python benchmarks/pareto.py report --plot docs/pareto.png     # markdown tables, and the figure

benchmarks/levers.py (one lever per run) and benchmarks/int8.py yolo (INT8 points) add theirs to the same file.
Every command but report appends JSON lines to --results (default /tmp/dfbf-pareto/results.jsonl) and
skips a point already there, so a long series can be run piece by piece. Synthetic sets, run directories
and finished steps (metrics, wall times) are kept under --work (default /tmp/dfbf-pareto): an
interrupted command resumes. dfbf commands run in fresh processes, as a user runs them, and are timed
(dfbf points: dfbf's default --scope; --extra passes the rest of the line to `dfbf compress`). Each
dfbf point's latency is timed interleaved with the original at 640 px (latency_original_ms), comparable
with the free curve's. Run on an otherwise idle machine: latencies and wall times are part of the result.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import PARETO_RESULTS, append_point, asset, machine, private_copy

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.engine.efficiency import measure_efficiency
from dfbf_cli.settings import DEFAULT_SCOPE, Allocation, Scope

CPU = torch.device("cpu")
WORK = Path("/tmp/dfbf-pareto")
SIZES = list(range(640, 415, -32))
CASES = {"pose": ("models/yolo11n-pose.pt", "coco-mini-pose", ("pose_map50_95", "box_map50_95")),
         "person": ("models/yolo11n-person.pt", "coco-mini-person", ("box_map50_95",))}
KEY_FIELDS = ("case", "kind", "imgsz", "flops_target", "scope", "allocation", "rounds", "seed", "extra")
STYLES = {"dfbf": ("*", "tab:red", "dfbf compress"), "original": ("s", "black", "ResNet-56, original"),
          "dense": ("D", "tab:blue", "ResNet-20, dense (smaller)"), "int8": ("P", "tab:green", "INT8 OpenVINO, calibrated on dfbf images")}


def metrics_of(case: str) -> tuple[str, ...]:
    return CASES[case][2] if case in CASES else ("top1",)


def key(point: dict) -> tuple[str, ...]:
    return tuple(str(point.get(field)) for field in KEY_FIELDS)


def load_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def pending(results: Path, points: list[dict]) -> list[dict]:
    done = {key(p) for p in load_results(results)}
    return [p for p in points if key(p) not in done]


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()``, or what an earlier call saved in ``path`` (a resumed command keeps finished steps and their timings)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def minutes(command: list[str]) -> float:
    """A ``dfbf ...`` command line run in a fresh process; its wall time in minutes."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dfbf_cli", *command[1:]], check=True)
    return (time.perf_counter() - start) / 60


def free(case: str, results: Path, work: Path) -> None:
    model, dataset, shown = CASES[case]
    todo = [p["imgsz"] for p in pending(results, [{"case": case, "kind": "free", "imgsz": s} for s in SIZES])]
    if not todo:
        print(f"free {case}: every size is in {results}")
        return
    original, data = load_model(str(asset(model))), load_data(private_copy(dataset))
    metrics = {}
    for size in todo:
        print(f"evaluate {model} on {dataset} at {size} px (batch 16)", flush=True)
        metrics[size] = cached(work / f"free-{case}-{size}.json", partial(original.evaluate, data, imgsz=size, batch=16, device=CPU))
    for size, eff in zip(todo, measure_efficiency([(original, s) for s in todo], device=CPU, runs=30)):
        append_point(results, {"case": case, "kind": "free", "imgsz": size, "gflops": eff.gflops, "latency_ms": eff.latency_cpu_ms,
                         **{m: metrics[size][m] for m in shown}}, CPU)


def dfbf(case: str, flops: list[float], scope: str, allocation: str, rounds: int, seed: int, extra: list[str], results: Path, work: Path) -> None:
    model_file, dataset, shown = CASES[case]
    model = str(asset(model_file))
    setting = {"case": case, "kind": "dfbf", "imgsz": 640, "scope": scope, "allocation": allocation, "rounds": rounds, "seed": seed, "extra": extra}
    todo = pending(results, [{**setting, "flops_target": f} for f in flops])
    if not todo:
        print(f"dfbf {case}: every target is in {results}")
        return
    synthetic = work / f"synthetic-{case}-{seed}"
    synthesis = cached(synthetic.with_name(synthetic.name + ".json"),
                       partial(minutes, ["dfbf", "synthesize", model, "--out", str(synthetic), "--seed", str(seed), "--device", "cpu", "-q"]))
    data, original = private_copy(dataset), load_model(model)
    for point in todo:
        tag = re.sub(r"[^A-Za-z0-9.]+", "_", " ".join(extra)).strip("_")
        run = work / f"run-{case}-flops{point['flops_target']}-{scope}-{allocation}-r{rounds}-s{seed}{'-' + tag if tag else ''}"
        command = ["dfbf", "compress", model, "--flops", str(point["flops_target"]), "--scope", scope, "--allocation", allocation,
                   "--rounds", str(rounds), "--synthetic", str(synthetic), "--data", str(data), "--seed", str(seed), "--out", str(run),
                   "--device", "cpu", "-q", *extra]
        compress = cached(run.with_name(run.name + ".json"), partial(minutes, command))
        report = json.loads((run / "report.json").read_text())
        compressed = original.reload(Path(report["files"]["compressed"]))
        before, after = measure_efficiency([(original, 640), (compressed, 640)], device=CPU, runs=30)
        verdict = report["free_alternative"] and {k: report["free_alternative"][k] for k in ("baseline_imgsz", "baseline", "compressed", "pays")}
        append_point(results, {**point, "gflops": after.gflops, "gflops_original": before.gflops, "latency_ms": after.latency_cpu_ms,
                         "latency_original_ms": before.latency_cpu_ms, **{m: report["models"]["compressed"]["metrics"][m] for m in shown},
                         "synthesis_min": synthesis, "compress_min": compress, "total_min": synthesis + compress,
                         "report_free_alternative": verdict, "command": shlex.join(command)}, CPU)


def cifar(seeds: list[int], allocation: str, results: Path, work: Path) -> None:
    """ResNet-56 at ratio 0.5 (uniform), or at the same GFLOPs (0.502) shared by --allocation sensitivity."""
    weights, npz = str(asset("models/cifar10-resnet56.th")), str(asset("data/cifar10-test-dev.npz"))
    todo = pending(results, [{"case": "cifar", "kind": k, "imgsz": 32} for k in ("original", "dense")]
                   + [{"case": "cifar", "kind": "dfbf", "imgsz": 32, "seed": s, "allocation": allocation} for s in seeds])
    if not todo:
        print(f"cifar: every point is in {results}")
        return
    original, dense = load_model("cifar-resnet56", weights), load_model("cifar-resnet20", str(asset("models/cifar10-resnet20.th")))
    data = load_data(npz)
    top1 = {kind: model.evaluate(data, imgsz=32, batch=500, device=CPU)["top1"] for kind, model in (("original", original), ("dense", dense))}
    runs = []
    for point in (p for p in todo if p["kind"] == "dfbf"):
        run = work / f"run-cifar-{allocation}-s{point['seed']}"
        target = ["--ratio", "0.5"] if allocation == Allocation.UNIFORM.value else ["--flops", "0.502", "--allocation", allocation]
        command = ["dfbf", "compress", "cifar-resnet56", "--weights", weights, *target, "--seed", str(point["seed"]), "--data", npz,
                   "--out", str(run), "--device", "cpu", "-q"]
        wall = cached(run.with_name(run.name + ".json"), partial(minutes, command))
        report = json.loads((run / "report.json").read_text())
        runs.append((point, original.reload(Path(report["files"]["compressed"])), report["models"]["compressed"]["metrics"]["top1"], wall, command))
    reference, smaller, *compressed = measure_efficiency([(original, 32), (dense, 32)] + [(model, 32) for _, model, *_ in runs], device=CPU, runs=50)
    for point in (p for p in todo if p["kind"] != "dfbf"):
        eff = reference if point["kind"] == "original" else smaller
        append_point(results, {**point, "top1": top1[point["kind"]], "gflops": eff.gflops, "latency_ms": eff.latency_cpu_ms}, CPU)
    for (point, _, accuracy, wall, command), eff in zip(runs, compressed):
        append_point(results, {**point, "ratio": 0.5, "top1": accuracy, "gflops": eff.gflops, "gflops_original": reference.gflops,
                         "latency_ms": eff.latency_cpu_ms, "latency_original_ms": reference.latency_cpu_ms, "compress_min": wall,
                         "command": shlex.join(command)}, CPU)


def free_curve_at(free_points: list[dict], gflops: float, metric: str) -> tuple[float, bool] | None:
    """The free curve's ``metric`` at ``gflops``, linear between its two nearest points; and whether that is an extrapolation."""
    curve = sorted(free_points, key=lambda p: p["gflops"])
    if len(curve) < 2:
        return None
    i = min(max(bisect.bisect([p["gflops"] for p in curve], gflops), 1), len(curve) - 1)
    lo, hi = curve[i - 1], curve[i]
    value = lo[metric] + (hi[metric] - lo[metric]) * (gflops - lo["gflops"]) / (hi["gflops"] - lo["gflops"])
    return value, not curve[0]["gflops"] <= gflops <= curve[-1]["gflops"]


def setting(point: dict) -> str:
    if point["kind"] == "free":
        return f"original at {point['imgsz']} px"
    if point["kind"] == "int8":
        return f"{point['model']}, INT8 OpenVINO calibrated on its dfbf synthetic set (benchmarks/int8.py)"
    if point["case"] == "cifar":
        target = "ratio 0.5" if point.get("allocation", "uniform") == "uniform" else f"GFLOPs 0.502, {point['allocation']}"
        return {"original": "ResNet-56", "dense": "ResNet-20"}.get(point["kind"], f"ResNet-56, {target}, seed {point.get('seed')}")
    extra = f", {shlex.join(point['extra'])}" if point["extra"] else ""
    via = f" ({point['via']})" if "via" in point else ""
    return f"{cost_target(point)}, {point['scope']}, {point['allocation']}, {point['rounds']} round(s), seed {point['seed']}{extra}{via}"


def cost_target(point: dict) -> str:
    """A dfbf point's cost target: the GFLOPs asked for, or (benchmarks/levers.py) a uniform ratio."""
    return f"ratio {point['ratio']:g}" if point.get("ratio") is not None and point["case"] != "cifar" else f"flops {point['flops_target']:g}"


def row(point: dict, reference: float | None, free_points: list[dict]) -> str:
    shown = metrics_of(point["case"])
    base = point.get("gflops_original", reference)
    delta = f"{100 * (point['gflops'] / base - 1):+.0f} %" if base else "-"
    latency = f"{point['latency_ms']:.1f}" + (f" (original {point['latency_original_ms']:.1f})" if "latency_original_ms" in point else "")
    wall = "-" if "compress_min" not in point else f"{point.get('total_min', point['compress_min']):.0f} min" + (
        f" ({point['synthesis_min']:.0f} synthesis + {point['compress_min']:.0f} compress)" if "synthesis_min" in point else "")
    at = free_curve_at(free_points, point["gflops"], shown[0]) if point["kind"] in ("dfbf", "int8") else None
    versus = "-" if at is None else (f"{'above' if point[shown[0]] >= at[0] else 'below'} the free curve by {abs(point[shown[0]] - at[0]):.3f} "
                                     f"(free: {at[0]:.3f}{', extrapolated' if at[1] else ''})")
    return (f"| {point['kind']} | {setting(point)} | {point['gflops']:.3g} | {delta} | {latency} | "
            + " / ".join(f"{point[m]:.4g}" for m in shown) + f" | {wall} | {versus} |")


def position(x: str, free_640_ms: float | None, point: dict) -> float:
    """Where a point goes on axis ``x``. A dfbf point's latency was timed in its own process beside the
    original: it is shown as that ratio times the free curve's 640-px latency, so that both share one clock."""
    if x == "latency_ms" and free_640_ms and "latency_original_ms" in point:
        return point["latency_ms"] / point["latency_original_ms"] * free_640_ms
    return point[x]


def plot(points: list[dict], cases: list[str], path: Path, machines: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 4.5 * len(cases)), squeeze=False)
    for (left, right), case in zip(axes, cases):
        metric, mine = metrics_of(case)[0], [p for p in points if p["case"] == case]
        free_points = sorted((p for p in mine if p["kind"] == "free"), key=lambda p: p["gflops"])
        for ax, x, label in ((left, "gflops", "GFLOPs"), (right, "latency_ms", "CPU latency, ms (batch 1; timed elsewhere: ratio to its original × 640 px)")):
            if free_points:
                ax.plot([p[x] for p in free_points], [p[metric] for p in free_points], "o-", color="tab:gray", label="original at a smaller input size")
                for p in free_points:
                    ax.annotate(f"{p['imgsz']}", (p[x], p[metric]), textcoords="offset points", xytext=(4, -10), fontsize=7)
            at = partial(position, x, next((p["latency_ms"] for p in free_points if p["imgsz"] == 640), None))
            for kind, (marker, color, name) in STYLES.items():
                group = [p for p in mine if p["kind"] == kind]
                if group:
                    ax.scatter([at(p) for p in group], [p[metric] for p in group], marker=marker, s=90, color=color, label=name, zorder=3)
                if kind == "dfbf":  # annotated with their GFLOPs target (CIFAR: their seed)
                    for p in group:
                        text = cost_target(p) if p["case"] != "cifar" else f"seed {p['seed']}"
                        ax.annotate(text, (at(p), p[metric]), textcoords="offset points", xytext=(5, 4), fontsize=8, color=color)
            ax.set(xlabel=label, ylabel=metric, title=f"{case}: {metric} vs {label.split(',')[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Does compression pay? dfbf compress vs the original at smaller input sizes\n{machines}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def report(results: Path, plot_path: Path | None) -> None:
    points = load_results(results)
    if not points:
        sys.exit(f"no results in {results}")
    machines = "; ".join(sorted({p["machine"] for p in points}))
    print(f"machine: {machines}")
    cases = [c for c in (*CASES, "cifar") if any(p["case"] == c for p in points)]
    for case in cases:
        mine = [p for p in points if p["case"] == case]
        free_points = [p for p in mine if p["kind"] == "free"]
        reference = next((p["gflops"] for p in mine if (p["kind"], p["imgsz"]) in (("free", 640), ("original", 32))), None)
        order = {"original": 0, "dense": 1, "free": 2, "dfbf": 3, "int8": 4}
        mine.sort(key=lambda p: (order[p["kind"]], -p["imgsz"], -(p.get("flops_target") or 0), p.get("seed") or 0))
        print(f"\n### {case}\n\n| kind | setting | GFLOPs | Δ GFLOPs vs original | latency ms | {' / '.join(metrics_of(case))} "
              "| wall time | vs the free curve at equal GFLOPs |\n|---|---|---|---|---|---|---|---|")
        print("\n".join(row(p, reference, free_points) for p in mine))
        original = [p["top1"] for p in mine if p["kind"] == "original"]
        for allocation in sorted({p.get("allocation", "uniform") for p in mine if p["kind"] == "dfbf"} if case == "cifar" and original else ()):
            top1 = [p["top1"] for p in mine if p["kind"] == "dfbf" and p.get("allocation", "uniform") == allocation]
            spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
            print(f"\ndfbf ({allocation}) top-1 over {len(top1)} seed(s): {statistics.mean(top1):.2f} ± {spread:.2f} % "
                  f"({statistics.mean(top1) - original[0]:+.2f} vs the original's {original[0]:.2f} %)")
    if plot_path is not None:
        plot(points, cases, plot_path, machines)


def parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--results", type=Path, default=PARETO_RESULTS, help="JSON lines file (default: %(default)s)")
    shared.add_argument("--work", type=Path, default=WORK, help="synthetic sets, run directories, finished steps (default: %(default)s)")
    top = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("free", parents=[shared], help="the original at 640..416 px").add_argument("case", choices=CASES)
    run = commands.add_parser("dfbf", parents=[shared], help="dfbf compress at GFLOPs targets")
    run.add_argument("case", choices=CASES)
    run.add_argument("--flops", type=float, nargs="+", default=[0.85, 0.75, 0.65, 0.55])
    run.add_argument("--scope", choices=[s.value for s in Scope], default=DEFAULT_SCOPE.value)
    run.add_argument("--allocation", choices=[a.value for a in Allocation], default=Allocation.UNIFORM.value)
    run.add_argument("--rounds", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="the rest of the line goes to dfbf compress (last)")
    cifar_run = commands.add_parser("cifar", parents=[shared], help="ResNet-56 at ratio 0.5 per seed, ResNet-20")
    cifar_run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cifar_run.add_argument("--allocation", choices=[a.value for a in Allocation], default=Allocation.UNIFORM.value)
    commands.add_parser("report", parents=[shared], help="markdown tables, and a figure").add_argument("--plot", type=Path)
    return top


def main() -> None:
    args = parser().parse_args()
    if args.command == "report":
        report(args.results, args.plot)
        return
    print(f"machine: {machine(CPU)}\n$ {shlex.join(['.venv/bin/python', 'benchmarks/pareto.py', *sys.argv[1:]])}", flush=True)
    if args.command == "free":
        free(args.case, args.results, args.work)
    elif args.command == "dfbf":
        dfbf(args.case, args.flops, args.scope, args.allocation, args.rounds, args.seed, args.extra, args.results, args.work)
    else:
        cifar(args.seeds, args.allocation, args.results, args.work)


if __name__ == "__main__":
    main()
