"""Structured pruning really shrinks every supported family, keeps the head, and stays loadable."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dfbf_cli.adapters import load_model
from dfbf_cli.engine.efficiency import count_params, gflops
from dfbf_cli.engine.pruning import FlopModel, choose, plan_keep, prune
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import Allocation, Criterion, PruneSettings, Scope
from tests.conftest import shared_asset

FAMILIES = [
    "yolov8n.yaml", "yolov8n-pose.yaml", "yolov8n-cls.yaml", "yolo11n.yaml", "yolo11n-pose.yaml", "yolo11n-cls.yaml",
    "yolo11n-seg.yaml", "yolo11n-obb.yaml",
    "shared:yolo11n-pose.pt", "shared:yolo11n-person.pt",
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:vgg16_bn", "torchvision:mobilenet_v2",
    "cifar-resnet20", "cifar-resnet56",
]


def _load(spec: str):
    if spec.startswith("shared:"):
        return load_model(str(shared_asset(f"models/{spec.removeprefix('shared:')}")))
    return load_model(spec)


def _outputs(adapter, x):
    with torch.no_grad():
        out = adapter.model.eval()(x)
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize("spec", FAMILIES)
def test_pruned_model_runs_keeps_head_and_shrinks(spec, scope):
    original = _load(spec)
    pruned, outcomes = prune(original, PruneSettings(0.3, scope=scope))
    size = 64 if original.input_spec.imgsz > 64 else original.input_spec.imgsz
    x = torch.rand(2, 3, size, size)
    assert [t.shape for t in _outputs(pruned, x)] == [t.shape for t in _outputs(original, x)]

    before, after = original.split(scope), pruned.split(scope)
    assert before.head_modules == after.head_modules
    for name, tensor in before.head.state_dict().items():
        assert torch.equal(tensor, after.head.state_dict()[name]), f"head tensor {name} changed"
    assert outcomes and all(o.after == PruneSettings(0.3).keep_count(o.before) for o in outcomes)
    assert count_params(after.backbone) < 0.85 * count_params(before.backbone)
    assert count_params(pruned.model) < count_params(original.model)


def _basic_block_params_removed(in_width: int, width: int, ratio: float) -> int:
    """conv1 filters (3×3×in_width each), their BN scale and shift, and the matching conv2 input slices."""
    removed = width - max(width - math.floor(width * ratio), 8)
    return removed * (9 * in_width + 2 + 9 * width)


def _stages(widths: list[int], blocks: int) -> list[tuple[int, int]]:
    """(input width, width) of every BasicBlock: a stage's first block reads the previous stage's width."""
    return [(widths[max(s - 1, 0)] if b == 0 else w, w) for s, w in enumerate(widths) for b in range(blocks)]


@pytest.mark.parametrize(("spec", "blocks"), [("cifar-resnet56", _stages([16, 32, 64], 9)), ("torchvision:resnet18", _stages([64, 128, 256, 512], 2))])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_parameter_count_drops_by_the_expected_amount(spec, blocks, ratio):
    original = load_model(spec)
    pruned, _ = prune(original, PruneSettings(ratio))
    expected = sum(_basic_block_params_removed(in_width, width, ratio) for in_width, width in blocks)
    assert count_params(original.model) - count_params(pruned.model) == expected


def test_ratio_zero_changes_nothing_and_choice_is_deterministic():
    original = load_model(str(shared_asset("models/yolo11n-pose.pt")))
    unchanged, _ = prune(original, PruneSettings(0.0))
    for key, tensor in original.model.state_dict().items():
        assert torch.equal(tensor, unchanged.model.state_dict()[key])
    first, _ = prune(original, PruneSettings(0.4, criterion="bn"))
    second, _ = prune(original, PruneSettings(0.4, criterion="bn"))
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))


def test_l1_keeps_the_largest_filters():
    original = load_model("cifar-resnet20")
    conv = original.model.layer1[0].conv1
    norms = conv.weight.detach().abs().flatten(1).sum(1)
    pruned, _ = prune(original, PruneSettings(0.5))
    kept = pruned.model.layer1[0].conv1.weight.detach().abs().flatten(1).sum(1)
    torch.testing.assert_close(kept.sort().values, norms.sort().values[-8:])


def test_trunk_scope_prunes_the_neck_too_and_saves_more():
    original = load_model("yolo11n-pose.yaml")
    backbone, trunk = (prune(original, PruneSettings(0.3, scope=scope))[0] for scope in Scope)
    neck = [name for name, _ in original.model.named_modules() if name.startswith(("model.13.", "model.17.", "model.20."))]
    assert not any(original.model.get_submodule(n).weight.shape != backbone.model.get_submodule(n).weight.shape
                   for n in neck if hasattr(original.model.get_submodule(n), "weight"))
    assert any(original.model.get_submodule(n).weight.shape != trunk.model.get_submodule(n).weight.shape
               for n in neck if hasattr(original.model.get_submodule(n), "weight"))
    x = torch.zeros(1, 3, 640, 640)
    assert gflops(trunk.model, x) < gflops(backbone.model, x) - 0.4  # measured: 5.94 vs 6.55 of 7.47


@pytest.mark.parametrize("spec", ["yolo11n-pose.yaml", "cifar-resnet20", "torchvision:mobilenet_v2"])
def test_flop_model_agrees_with_torch_flop_counter(spec):
    original = load_model(spec)
    size = min(original.input_spec.imgsz, 128)
    scope = Scope.TRUNK
    groups = original.channel_groups(scope)
    x = torch.zeros(1, 3, size, size)
    flops = FlopModel(original.model, groups, x)
    keep = {g.name: max(1, g.size - (index % 5) * g.size // 8) for index, g in enumerate(groups)}  # uneven, some untouched
    pruned, _ = prune(original, PruneSettings(0.5, scope=scope), choose(original, PruneSettings(0.5, scope=scope), keep))
    assert flops.gflops({}) == pytest.approx(gflops(original.model, x), rel=1e-9)
    assert flops.gflops(keep) == pytest.approx(gflops(pruned.model, x), rel=1e-9)


@pytest.mark.parametrize("allocation", list(Allocation))
@pytest.mark.parametrize("target", [0.85, 0.7])
def test_a_flops_target_is_met_within_one_rounding_step(allocation, target):
    original = load_model("yolo11n-pose.yaml")
    settings = PruneSettings(flops=target, scope=Scope.TRUNK, allocation=allocation)
    probe = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    keep = plan_keep(original, settings, imgsz=128, probe=probe, device=torch.device("cpu"))
    pruned, _ = prune(original, settings, choose(original, settings, keep))
    x = torch.zeros(1, 3, 128, 128)
    base, achieved = gflops(original.model, x), gflops(pruned.model, x)
    groups = original.channel_groups(Scope.TRUNK)
    flops = FlopModel(original.model, groups, x)
    one_step_back = max(flops.gflops({**keep, name: count + 1}) for name, count in keep.items()
                        if count < next(g.size for g in groups if g.name == name))
    assert achieved <= target * base < one_step_back  # met, and one channel fewer removed would not meet it
    if allocation == Allocation.SENSITIVITY:  # not a uniform ratio in disguise
        ratios = {round(1 - keep[g.name] / g.size, 2) for g in groups}
        assert len(ratios) > 2


def test_rounding_and_layer_dependent_schedule():
    assert PruneSettings(0.3, round_to=8).keep_count(64) == 48  # 45 rounded to a multiple of 8
    assert PruneSettings(0.5, schedule="layer-dependent").keep_count(1024) == 1024 - math.floor(1024 * 0.65)
    assert PruneSettings(0.5, schedule="layer-dependent").keep_count(64) == 64 - math.floor(64 * 0.2)
    with pytest.raises(DfbfError, match="bn"):
        prune(load_model("torchvision:vgg16"), PruneSettings(0.3, criterion="bn"))


def test_pruned_yolo_loads_predicts_and_validates_without_dfbf(run_cli, tmp_path, dataset_copy):
    out = tmp_path / "pruned.pt"
    result = run_cli("prune", shared_asset("models/yolo11n-pose.pt"), "--ratio", "0.3", "--out", out,
                     "--latency-runs", "2", "--device", "cpu", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after"]["backbone_params"] < 0.75 * report["before"]["backbone_params"]
    assert report["after"]["gflops"] < report["before"]["gflops"] and report["pruned_layers"]
    data = dataset_copy("coco8-pose")
    script = (
        "import sys, numpy as np\n"
        "from ultralytics import YOLO\n"
        f"model = YOLO({str(out)!r})\n"
        "model.predict(np.zeros((320, 320, 3), np.uint8), imgsz=320, verbose=False)\n"
        f"metrics = model.val(data={str(data)!r}, imgsz=320, batch=4, plots=False, verbose=False, workers=0)\n"
        "assert 'dfbf_cli' not in sys.modules\n"
        "print('pose-map', metrics.results_dict['metrics/mAP50-95(P)'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=data.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pose-map" in done.stdout


def test_dry_run_writes_nothing(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("prune", "cifar-resnet20", "--ratio", "0.5", "--dry-run", "--json", "--latency-runs", "1", "-q")
    assert result.code == 0 and json.loads(result.stdout)["out"] is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "0"], "--ratio must be"), (["--ratio", "1"], "--ratio must be"), (["--ratio", "-0.2"], "--ratio must be"),
        (["--ratio", "nan"], "--ratio must be"), (["--ratio", "0.3", "--criterion", "magic"], "'magic' is not one of"),
        (["--ratio", "0.3", "--schedule", "random"], "'random' is not one of"), (["--ratio", "0.3", "--out", "x.onnx"], "suffix"),
        ([], "Give --ratio"), (["--ratio", "0.3", "--flops", "0.7"], "one of them"),
        (["--flops", "0"], "--flops must be"), (["--flops", "1"], "--flops must be"), (["--flops", "1.5"], "--flops must be"),
        (["--flops", "-0.1"], "--flops must be"), (["--flops", "0.01"], "cannot be reached"),
        (["--flops", "0.5", "--allocation", "sensitivity"], "--synthetic"),
        (["--ratio", "0.3", "--allocation", "sensitivity"], "applies to a --flops target"),
    ],
)
def test_prune_user_mistakes_exit_2(run_cli, args, message):
    result = run_cli("prune", "cifar-resnet20", *args)
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_refuses_to_overwrite_the_input(run_cli, tmp_path):
    model = tmp_path / "r20.pth"
    torch.save(load_model("cifar-resnet20").model.state_dict(), model)
    result = run_cli("prune", "cifar-resnet20", "--weights", model, "--ratio", "0.3", "--out", model)
    assert result.code == 2 and "is --weights itself" in result.stderr


@pytest.mark.parametrize("spec", ["yolo11n-pose.yaml", "yolov8n.yaml", "yolo11n-seg.yaml", "torchvision:mobilenet_v2", "cifar-resnet20"])
def test_cutting_channels_that_carry_nothing_changes_nothing(spec):
    """Each group's wiring (consumers, concatenation offsets, pooled copies) is right: channels whose
    activations are exactly zero (BatchNorm scale and shift zeroed, so SiLU/ReLU gives 0) can be cut
    from every group at once without changing the output."""
    from dfbf_cli.engine.pruning import apply_pruning

    adapter = load_model(spec)
    model = adapter.model.eval()
    groups = adapter.channel_groups(Scope.TRUNK)
    kept = {}
    with torch.no_grad():
        for group in groups:
            norm = next(model.get_submodule(p.module) for p in group.producers if isinstance(model.get_submodule(p.module), torch.nn.BatchNorm2d))
            offset = next(p.offset for p in group.producers if isinstance(model.get_submodule(p.module), torch.nn.BatchNorm2d))
            dropped = torch.arange(1, group.size, 3)  # every third channel
            norm.weight[offset + dropped] = 0.0
            norm.bias[offset + dropped] = 0.0
            kept[group.name] = torch.tensor([c for c in range(group.size) if c not in set(dropped.tolist())])
    size = min(adapter.input_spec.imgsz, 96)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = _outputs(adapter, x)
    apply_pruning(model, groups, kept)
    after = _outputs(adapter, x)
    assert count_params(model) < count_params(load_model(spec).model)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_energy_criterion_drops_the_channel_nothing_reads_where_l1_keeps_it():
    """Channel 3 of a block's hidden layer has the largest filter but the next convolution ignores it: energy
    pruning (scored on images) removes it and the outputs stay exactly the same; L1 keeps it and they change."""
    adapter = load_model("cifar-resnet20")
    model = adapter.model.eval()
    with torch.no_grad():
        model.layer1[0].conv1.weight[3] *= 10
        model.layer1[0].conv2.weight[:, 3] = 0
    groups = adapter.channel_groups()
    group = next(g for g in groups if any(p.module == "layer1.0.conv1" for p in g.producers))
    keep = {g.name: g.size for g in groups} | {group.name: group.size - 1}
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    energy, _ = prune(adapter, PruneSettings(0.1), choose(adapter, PruneSettings(0.1, criterion=Criterion.ENERGY), keep, images))
    l1, _ = prune(adapter, PruneSettings(0.1), choose(adapter, PruneSettings(0.1, criterion=Criterion.L1), keep))
    x = adapter.input_spec.normalize(images)
    torch.testing.assert_close(_outputs(energy, x), _outputs(adapter, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_outputs(l1, x)[0], _outputs(adapter, x)[0], atol=1e-3)
    with pytest.raises(DfbfError, match="--synthetic"):  # it needs images
        choose(adapter, PruneSettings(0.1, criterion=Criterion.ENERGY), keep)
