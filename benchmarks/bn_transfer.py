"""Are a distilled student's BatchNorm statistics what holds it back on real images? docs/finetune.md's table.

    .venv/bin/python benchmarks/bn_transfer.py yolo SYNTHETIC_DIR RUN/compressed.pt [...]   # students of yolo11n-pose at ratio 0.3
    .venv/bin/python benchmarks/bn_transfer.py cifar SYNTHETIC_DIR --steps 960              # distils ResNet-56 at 0.5 first (≈5 min)

Fine-tuning with train-mode BatchNorm leaves the student the running statistics of its augmented
synthetic batches; the teacher's were estimated on real data. Each student is scored (coco-mini-pose
at 640 px / the 5,000-image CIFAR dev file) as it is and with its backbone's statistics replaced by:
``synthetic`` (re-estimated on 64 clean synthetic images, batch statistics in every layer),
``teacher`` (the teacher's real-data statistics of the channels it kept) and ``transfer`` (the teacher's,
shifted and scaled by how the student's pre-BatchNorm activations differ from the teacher's on the same
synthetic images: mean_T + (m_S − m_T), var_T · v_S / v_T). Run alone on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from common import asset, machine, private_copy
from torch import nn

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import ModelAdapter
from dfbf_cli.engine.finetune import finetune
from dfbf_cli.engine.pruning import choose, kept_outputs, prune
from dfbf_cli.engine.reconstruct import fitted_layers
from dfbf_cli.engine.runtime import resolve_precision
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import FinetuneSettings, PruneSettings

CPU = torch.device("cpu")
STAT_IMAGES = 64
CASES = {
    "yolo": (lambda: load_model(str(asset("models/yolo11n-pose.pt"))), 0.3, lambda: load_data(private_copy("coco-mini-pose")), 640, 16),
    "cifar": (lambda: load_model("cifar-resnet56", str(asset("models/cifar10-resnet56.th"))), 0.5,
              lambda: load_data(str(asset("data/cifar10-test-dev.npz"))), 32, 500),
}


@torch.no_grad()
def input_statistics(adapter: ModelAdapter, images: torch.Tensor, scope, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and variance per channel of each named BatchNorm's input, every BatchNorm normalising with batch statistics."""
    model, sums, handles = adapter.model, {}, []
    for name in names:
        def hook(_m, inputs, name=name) -> None:
            x = inputs[0].double()
            moments = sums.setdefault(name, [0.0, 0.0, 0])
            moments[0] += x.sum((0, 2, 3))
            moments[1] += x.square().sum((0, 2, 3))
            moments[2] += x.numel() // x.shape[1]
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # batch statistics, running ones untouched
    try:
        adapter.split(scope).backbone.train()
        for i in range(0, len(images), 32):
            adapter.split(scope).backbone(adapter.input_spec.normalize(images[i : i + 32].float() / 255))
    finally:
        for handle in handles:
            handle.remove()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return {name: (s1 / n, s2 / n - (s1 / n).square()) for name, (s1, s2, n) in sums.items()}


def statistics_variants(student: ModelAdapter, teacher: ModelAdapter, images: torch.Tensor, kept: dict[str, torch.Tensor],
                        scope) -> dict[str, ModelAdapter]:
    """Copies of ``student`` with its backbone's running statistics replaced, one per way (the measurements made once)."""
    pairs = [(conv, bn) for conv, bn in fitted_layers(student, scope, student.input_spec.normalize(images[:1].float() / 255)) if bn]
    names = [bn for _, bn in pairs]
    mine, theirs = input_statistics(student, images, scope, names), input_statistics(teacher, images, scope, names)
    variants = {}
    for how in ("synthetic", "teacher", "transfer"):
        variant = student.with_model(copy.deepcopy(student.model))
        for conv, name in pairs:
            norm, original = variant.model.get_submodule(name), teacher.model.get_submodule(name)
            index = kept.get(conv, torch.arange(original.num_features))
            if len(index) != norm.num_features:
                raise SystemExit(f"{name} has {norm.num_features} channels, not the {len(index)} that one-shot L1 pruning at this ratio keeps: "
                                 "this benchmark reads students pruned that way only")
            mean_t, var_t = original.running_mean[index].double(), original.running_var[index].double()
            (m_s, v_s), (m_t, v_t) = mine[name], (t.index_select(0, index) for t in theirs[name])
            mean, var = {"transfer": (mean_t + m_s - m_t, var_t * v_s / v_t.clamp_min(1e-8)), "teacher": (mean_t, var_t), "synthetic": (m_s, v_s)}[how]
            norm.running_mean.copy_(mean.float())
            norm.running_var.copy_(var.float().clamp_min(1e-6))
        variant.weights_changed()
        variants[how] = variant
    return variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("students", nargs="*", help="yolo: compressed models of yolo11n-pose pruned at ratio 0.3 (uniform, backbone)")
    parser.add_argument("--steps", type=int, default=960, help="cifar: distillation steps of the student made here")
    args = parser.parse_args()
    if args.case == "yolo" and not args.students:
        parser.error("yolo: give the compressed models to look at (RUN/compressed.pt of `dfbf compress --ratio 0.3`)")
    load, ratio, data, imgsz, batch = CASES[args.case]
    teacher, labelled = load(), data()
    images = SyntheticDataset.open(args.synthetic).load()[0]
    settings = PruneSettings(ratio)
    kept = kept_outputs(teacher, settings.scope, choose(teacher, settings))
    if args.case == "yolo":
        students = [(path, load_model(path)) for path in args.students]
    else:
        student, _ = prune(teacher, settings)
        tuning = FinetuneSettings(epochs=max(1, args.steps // (len(images) // 32)), precision=resolve_precision("auto", CPU))
        with tempfile.TemporaryDirectory() as tmp:
            finetune(student, teacher, images, settings=tuning, scope=settings.scope, device=CPU, seed=0, state_path=Path(tmp) / "state.pt")
        students = [(f"ResNet-56 at 0.5, {args.steps} steps", student)]
    print(f"machine: {machine(CPU)}; synthetic set {args.synthetic}")
    for label, student in students:
        for how, model in {"as it is": student, **statistics_variants(student, teacher, images[:STAT_IMAGES], kept, settings.scope)}.items():
            scores = model.evaluate(labelled, imgsz=imgsz, batch=batch, device=CPU)
            print(json.dumps({"student": label, "statistics": how, **{k: round(v, 4) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()
