"""Fine-tuning recovers features on synthetic images; compress runs end to end and resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dfbf_cli.engine.finetune as finetune_module
from dfbf_cli.adapters import load_model
from dfbf_cli.settings import Scope
from tests.conftest import cifar_subset, quick_synthetic, shared_asset, stock_ultralytics_predicts

QUIET = ["--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def r20():
    return ["cifar-resnet20", "--weights", str(shared_asset("models/cifar10-resnet20.th"))]


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory, r20):
    """16 synthetic 32-px images from the real ResNet-20 (a few iterations: enough to exercise the stages)."""
    return quick_synthetic(r20, tmp_path_factory.mktemp("synth") / "r20", low_res=5, iterations=10)


@pytest.fixture(scope="module")
def pruned_r20(tmp_path_factory, r20):
    from dfbf_cli.engine.pruning import prune
    from dfbf_cli.settings import PruneSettings

    path = tmp_path_factory.mktemp("pruned") / "r20-p50.safetensors"
    pruned, _ = prune(load_model(r20[0], r20[2]), PruneSettings(0.5))
    pruned.save(path)
    return path


def _finetune(run_cli, pruned, synthetic, out, *extra):
    return run_cli("finetune", pruned, "--teacher", "cifar-resnet20", "--teacher-weights", shared_asset("models/cifar10-resnet20.th"),
                   "--data", synthetic, "--out", out, "--batch", "8", *extra, *QUIET)


def test_finetune_lowers_the_feature_loss_and_keeps_the_original_head(run_cli, tmp_path, tiny_synthetic, pruned_r20, r20):
    out = tmp_path / "ft.safetensors"
    result = _finetune(run_cli, pruned_r20, tiny_synthetic, out, "--epochs", "20", "--json")
    assert result.code == 0, result.stderr
    history = json.loads(result.stdout)["history"]
    assert json.loads(result.stdout)["settings"]["precision"] in {"bf16", "fp32"}  # what `auto` became here, not "auto"
    losses = [epoch["loss"] for epoch in history]
    assert losses[-1] < losses[len(losses) // 2] < losses[0] and losses[-1] < 0.9 * losses[0]
    student, teacher = load_model(str(out)), load_model(r20[0], r20[2])
    assert torch.equal(student.model.linear.weight, teacher.model.linear.weight)
    assert torch.equal(student.model.linear.bias, teacher.model.linear.bias)
    assert student.model.layer1[0].conv1.out_channels == 8  # still pruned
    assert not (tmp_path / "ft.finetune-state.pt").exists()  # the checkpoint goes once the model is written


def test_interrupted_finetune_resumes_to_the_same_model(run_cli, tmp_path, tiny_synthetic, pruned_r20, monkeypatch):
    reference = tmp_path / "reference.safetensors"
    assert _finetune(run_cli, pruned_r20, tiny_synthetic, reference, "--epochs", "3").code == 0

    out = tmp_path / "resumed.safetensors"
    real_augment, calls = finetune_module.augment, {"n": 0}

    def augment_then_die(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # first step of epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt
        return real_augment(*args)

    monkeypatch.setattr(finetune_module, "augment", augment_then_die)
    assert _finetune(run_cli, pruned_r20, tiny_synthetic, out, "--epochs", "3").code == 130
    monkeypatch.setattr(finetune_module, "augment", real_augment)
    state = tmp_path / "resumed.finetune-state.pt"
    assert state.exists() and not out.exists()
    refused = _finetune(run_cli, pruned_r20, tiny_synthetic, out, "--epochs", "3")
    assert refused.code == 2 and "--resume" in refused.stderr
    assert _finetune(run_cli, pruned_r20, tiny_synthetic, out, "--epochs", "3", "--resume").code == 0
    for a, b in zip(load_model(str(out)).model.state_dict().values(), load_model(str(reference)).model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_cutmix_pastes_one_box_from_a_partner_image():
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()  # image k is all k
    mixed = finetune_module.cutmix(images, torch.Generator().manual_seed(3))
    changed = mixed != images
    assert changed.any() and mixed.shape == images.shape
    box = changed.any(dim=(0, 1))  # the same box in every image: a rectangle
    rows, cols = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
    assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    for k in range(8):  # inside the box, one other image's value; outside, its own
        inside = mixed[k, :, box]
        assert (inside == inside.flatten()[0]).all() and torch.equal(mixed[k, :, ~box], images[k, :, ~box])


def test_weight_decay_is_applied_when_asked_and_validated(run_cli, tmp_path, tiny_synthetic, pruned_r20, r20):
    from dfbf_cli.engine.finetune import finetune
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
    from dfbf_cli.settings import FinetuneSettings

    images, _ = SyntheticDataset.open(tiny_synthetic).load()
    norms = {}
    for decay in (0.0, 1.0):
        student = load_model(str(pruned_r20))
        finetune(student, load_model(r20[0], r20[2]), images, settings=FinetuneSettings(epochs=2, batch=8, weight_decay=decay),
                 scope=Scope.BACKBONE, device=torch.device("cpu"), seed=0, state_path=tmp_path / f"state-{decay}.pt")
        norms[decay] = sum(float(p.norm()) for p in student.split().backbone.parameters())
    assert norms[1.0] < 0.99 * norms[0.0]
    refused = _finetune(run_cli, pruned_r20, tiny_synthetic, tmp_path / "x.safetensors", "--weight-decay", "-1")
    assert refused.code == 2 and "--weight-decay" in refused.stderr


def test_precision_auto_follows_the_hardware_and_bf16_trains_in_bfloat16(run_cli, tmp_path, tiny_synthetic, pruned_r20, r20, monkeypatch):
    from dfbf_cli.engine.finetune import finetune
    from dfbf_cli.engine.runtime import resolve_precision
    from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
    from dfbf_cli.settings import FinetuneSettings

    cpu = torch.device("cpu")
    for native in (True, False):
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda native=native: native, raising=False)
        assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"

    images, _ = SyntheticDataset.open(tiny_synthetic).load()
    for precision in ("bf16", "fp32"):
        student, seen = load_model(str(pruned_r20)), set()
        student.model.conv1.register_forward_hook(lambda _m, _i, output, seen=seen: seen.add(output.dtype))
        history = finetune(student, load_model(r20[0], r20[2]), images, settings=FinetuneSettings(epochs=3, batch=8, precision=precision),
                           scope=Scope.BACKBONE, device=cpu, seed=0, state_path=tmp_path / f"state-{precision}.pt")
        assert (torch.bfloat16 in seen) == (precision == "bf16") and history[-1].loss < history[0].loss
        assert all(p.dtype == torch.float32 for p in student.model.parameters())  # weights stay fp32
    refused = _finetune(run_cli, pruned_r20, tiny_synthetic, tmp_path / "x.safetensors", "--precision", "fp16")
    assert refused.code == 2 and "--precision" in refused.stderr


def test_teacher_student_mismatch_is_refused(run_cli, tmp_path, tiny_synthetic, pruned_r20):
    wrong_arch = run_cli("finetune", pruned_r20, "--teacher", "cifar-resnet56", "--teacher-weights", shared_asset("models/cifar10-resnet56.th"),
                         "--data", tiny_synthetic, "--out", tmp_path / "x.safetensors", "--allow-teacher-mismatch", *QUIET)
    assert wrong_arch.code == 2 and "feature taps" in wrong_arch.stderr
    wrong_family = run_cli("finetune", pruned_r20, "--teacher", "yolov8n-cls.yaml", "--data", tiny_synthetic,
                           "--out", tmp_path / "y.safetensors", "--allow-teacher-mismatch", *QUIET)
    assert wrong_family.code == 2 and "same family and task" in wrong_family.stderr
    wrong_weights = run_cli("finetune", pruned_r20, "--teacher", "cifar-resnet20", "--data", tiny_synthetic,
                            "--out", tmp_path / "z.safetensors", *QUIET)
    assert wrong_weights.code == 2 and "--allow-teacher-mismatch" in wrong_weights.stderr


@pytest.fixture(scope="module")
def class_balanced_npz(tmp_path_factory):
    """200 test images, 20 per class (the file is sorted by class: sample across it)."""
    subset = cifar_subset(20)
    path = tmp_path_factory.mktemp("data") / "subset.npz"
    np.savez(path, x=subset.arrays, y=subset.labels)
    return path


def test_compress_reuses_a_synthetic_dataset_and_gates_on_max_drop(run_cli, tmp_path, tiny_synthetic, r20, class_balanced_npz, quick_synthesis):
    run_dir = tmp_path / "run"
    args = ["compress", *r20, "--ratio", "0.9", "--synthetic", tiny_synthetic, "--data", class_balanced_npz,
            "--out", run_dir, "--epochs", "1", "--preset", "quick", "--precision", "fp32", *QUIET]
    first = run_cli(*args, "--json")
    assert first.code == 0, first.stderr
    report = json.loads(first.stdout)
    assert not (run_dir / "synthetic").exists()  # reused, not regenerated
    for name in ("compressed.th", "pruned.th", "report.json", "report.md", "report.png", "run.json"):
        assert (run_dir / name).exists(), name
    assert report["precision"] == "fp32" and "Fine-tuning: 1 epoch in fp32," in (run_dir / "report.md").read_text()
    drop = report["metric_drop"]
    assert drop["metric"] == "top1" and drop["drop"] > 5  # 90 % of the channels gone, one tiny epoch
    assert report["models"]["compressed"]["efficiency"]["params"] < report["models"]["original"]["efficiency"]["params"]
    stamp = (run_dir / "compressed.th").stat().st_mtime_ns

    gated = run_cli(*args, "--max-drop", str(drop["drop"] / 2))
    assert gated.code == 1 and "more than --max-drop" in gated.stderr
    assert run_cli(*args, "--max-drop", str(drop["drop"] + 1)).code == 0
    assert (run_dir / "compressed.th").stat().st_mtime_ns == stamp  # finished stages are not redone

    other = run_cli("compress", *r20, "--ratio", "0.5", "--synthetic", tiny_synthetic, "--out", run_dir, *QUIET)
    assert other.code == 2 and "ratio" in other.stderr


def test_compress_yolo_end_to_end_loads_in_stock_ultralytics(run_cli, tmp_path, dataset_copy, quick_synthesis):
    model = shared_asset("models/yolo11n-pose.pt")
    synthetic = tmp_path / "synth"
    assert run_cli("synthesize", model, "--out", synthetic, "--num-images", "4", "--batch", "4", "--imgsz", "64",
                   "--iterations", "2", "--low-res-iterations", "1", *QUIET).code == 0
    data = dataset_copy("coco8-pose")
    result = run_cli("compress", model, "--ratio", "0.3", "--synthetic", synthetic, "--data", data, "--out", tmp_path / "run",
                     "--epochs", "1", "--imgsz", "64", "--preset", "quick", "--json", *QUIET)
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["models"]) == {"original", "pruned", "compressed"}
    assert "pose_map50_95" in report["models"]["compressed"]["metrics"]
    stock_ultralytics_predicts(tmp_path / "run" / "compressed.pt", 64, "keypoints")


def test_presets_budget_fine_tuning_in_optimiser_steps():
    """A large-input model's small synthetic set gets more epochs, not fewer updates, and large inputs
    more steps (docs/finetune.md)."""
    from dfbf_cli.settings import PRESETS

    balanced = PRESETS["balanced"]
    cifar_images, yolo_images = balanced.num_images(32), balanced.num_images(balanced.imgsz(640))
    assert (cifar_images, yolo_images) == (1024, 128)
    assert balanced.epochs(cifar_images, 32, 32) == 30  # 960 steps of 32 images
    assert balanced.epochs(yolo_images, 32, 320) == 800  # 3,200 steps
    assert balanced.epochs(100, 32, 32) == 320  # 3 full batches an epoch: the ragged one is dropped
    assert balanced.epochs(10, 32, 32) == 960  # fewer images than a batch: one batch of all of them
    assert balanced.epochs(0, 32, 32) == 960  # an unfilled dataset is refused later, with its own message
    assert balanced.epochs(128, 32, 64) == 240 and balanced.epochs(128, 32, 65) == 800  # the split is by input size alone
