"""Progressive (Paoding-style) pruning and robustness evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfbf_cli.adapters import load_model
from dfbf_cli.adapters.scoring import classification_accuracy, classification_robustness
from dfbf_cli.engine.efficiency import count_params
from dfbf_cli.engine.progressive import merge_channel, progressive_prune
from dfbf_cli.engine.pruning import apply_pruning, prune
from dfbf_cli.settings import ProgressiveSettings, PruneSettings
from tests.conftest import cifar_subset, shared_asset


def _probe(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_merging_a_channel_into_its_identical_twin_changes_nothing():
    adapter = load_model("cifar-resnet20")
    model = adapter.model.eval()
    block = model.layer1[0]
    with torch.no_grad():  # make channel 5 an exact copy of channel 2 (filter and BatchNorm)
        block.conv1.weight[5] = block.conv1.weight[2]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn1, name)[5] = getattr(block.bn1, name)[2]
    x = _probe()
    with torch.no_grad():
        before = model(x)
    group = next(g for g in adapter.channel_groups() if g.name == "layer1.0.conv1")
    merge_channel(model, group, removed=5, survivor=2)
    apply_pruning(model, [group], {group.name: torch.tensor([c for c in range(16) if c != 5])})
    assert block.conv1.out_channels == 15
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["cifar-resnet20", "yolov8n-pose.yaml"])
def test_progressive_reaches_the_ratio_exactly_and_is_seeded(spec):
    adapter = load_model(spec)
    settings = PruneSettings(0.15)  # each removed channel costs a scoring pass: a small ratio keeps YOLO's run short
    size, quick = 32, ProgressiveSettings(steps=2, probe_images=2)
    keep = {g.name: settings.keep_count(g.size) for g in adapter.channel_groups()}
    first, outcomes = progressive_prune(adapter, settings, keep, quick, _probe(2, size), seed=7)
    assert all(o.after == settings.keep_count(o.before) for o in outcomes)
    one_shot, _ = prune(adapter, settings)
    assert count_params(first.model) == count_params(one_shot.model)
    if spec.startswith("cifar"):  # seeded: the same again (checked on the cheap model)
        again, _ = progressive_prune(adapter, settings, keep, quick, _probe(2, size), seed=7)
        for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
            assert torch.equal(a, b)
    before, after = adapter.split(), first.split()
    for name, tensor in before.head.state_dict().items():
        assert torch.equal(tensor, after.head.state_dict()[name])
    x = _probe(2, size)
    with torch.no_grad():
        out_a, out_b = adapter.model.eval()(x), first.model.eval()(x)
    shapes = lambda out: [t.shape for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]  # noqa: E731
    assert shapes(out_a) == shapes(out_b)


def test_progressive_keeps_more_accuracy_than_one_shot_at_the_same_size():
    """The paper's claim, on a real model before fine-tuning (measured with this test's settings: 19.2 % vs 11.6 % top-1 at 0.5)."""
    adapter = load_model("cifar-resnet20", str(shared_asset("models/cifar10-resnet20.th")))
    data = cifar_subset(50)
    probe = torch.from_numpy(data.arrays[::125]).permute(0, 3, 1, 2).float() / 255  # 4 images across classes (8: 16.2 %, in 1.5× the time)
    settings = PruneSettings(0.5)
    keep = {g.name: settings.keep_count(g.size) for g in adapter.channel_groups()}
    progressive, _ = progressive_prune(adapter, settings, keep, ProgressiveSettings(steps=4), probe, seed=0)  # 4 steps: the gap holds, in half the time of 8
    one_shot, _ = prune(adapter, settings)
    accuracy = lambda a: classification_accuracy(a.scorer(torch.device("cpu")), data, imgsz=32, batch=500, num_outputs=10)["top1"]  # noqa: E731
    assert count_params(progressive.model) == count_params(one_shot.model)
    assert accuracy(progressive) > accuracy(one_shot) + 3


def test_fgsm_at_zero_equals_the_clean_metric_and_attacks_hurt():
    adapter = load_model("cifar-resnet20", str(shared_asset("models/cifar10-resnet20.th")))
    data = cifar_subset(20)
    scorer = adapter.scorer(torch.device("cpu"))
    clean = classification_accuracy(scorer, data, imgsz=32, batch=100, num_outputs=10)["top1"]
    robust = classification_robustness(scorer, data, imgsz=32, batch=100, epsilons=(0.0, 0.05), sigma=0.0)
    assert robust["top1_fgsm_0"] == clean and robust["top1_noise_0"] == clean  # no perturbation, no change
    assert robust["top1_fgsm_0.05"] < clean - 10
    noisy = classification_robustness(scorer, data, imgsz=32, batch=100, epsilons=(), sigma=0.3)
    assert noisy["top1_noise_0.3"] < clean - 20


def test_eval_robustness_flag_reports_perturbed_metrics(run_cli, dataset_copy, tmp_path):
    weights = shared_asset("models/cifar10-resnet20.th")
    subset = cifar_subset(50)
    np.savez(tmp_path / "subset.npz", x=subset.arrays, y=subset.labels)
    result = run_cli("eval", "cifar-resnet20", "--weights", weights, "--data", tmp_path / "subset.npz",
                     "--robustness", "--batch", "1000", "--latency-runs", "1", "--json", "-q")
    assert result.code == 0, result.stderr
    metrics = json.loads(result.stdout)["models"][0]["metrics"]
    assert {"top1", "top1_fgsm_0.01", "top1_fgsm_0.05", "top1_noise_0.05"} <= set(metrics)
    assert max(metrics["top1_fgsm_0.01"], metrics["top1_fgsm_0.05"]) < metrics["top1"] - 20  # one FGSM step already hurts a lot
    yolo = run_cli("eval", shared_asset("models/yolo11n-pose.pt"), "--data", dataset_copy("coco8-pose"), "--robustness",
                   "--latency-runs", "1", "--json", "-q")
    assert yolo.code == 0, yolo.stderr
    pose = json.loads(yolo.stdout)["models"][0]["metrics"]
    assert {"pose_map50_95_noise_0.05", "box_map50_95_noise_0.05"} <= set(pose)


def test_progressive_prune_cli(run_cli, tmp_path):
    weights = str(shared_asset("models/cifar10-resnet20.th"))
    missing = run_cli("prune", "cifar-resnet20", "--weights", weights, "--ratio", "0.3", "--strategy", "progressive", "--dry-run")
    assert missing.code == 2 and "--synthetic" in missing.stderr
    unknown = run_cli("prune", "cifar-resnet20", "--ratio", "0.3", "--strategy", "greedy")
    assert unknown.code == 2 and "'greedy' is not one of" in unknown.stderr
    synthetic = tmp_path / "synth"
    assert run_cli("synthesize", "cifar-resnet20", "--weights", weights, "--out", synthetic, "--num-images", "8", "--batch", "8",
                   "--iterations", "2", "--low-res-iterations", "0", "-q").code == 0
    out = tmp_path / "progressive.th"
    result = run_cli("prune", "cifar-resnet20", "--weights", weights, "--ratio", "0.1", "--strategy", "progressive",
                     "--synthetic", synthetic, "--steps", "2", "--out", out, "--latency-runs", "1", "--json", "-q")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["strategy"] == "progressive" and report["after"]["params"] < report["before"]["params"]
    assert load_model("cifar-resnet20", str(out)).model.layer1[0].conv1.out_channels == 15
