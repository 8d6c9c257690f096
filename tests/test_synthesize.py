"""Synthetic images from the model alone, as a dataset that is valid, resumable and self-checking."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dfbf_cli.adapters import load_data, load_model
from dfbf_cli.contract import IMAGENET, BackboneSplit, InputSpec
from dfbf_cli.engine.synthesis import synthesize_batch
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.errors import DfbfError
from dfbf_cli.settings import SynthesisSettings
from tests.conftest import random_cifar, shared_asset

TINY = ["--iterations", "4", "--low-res-iterations", "2", "--device", "cpu", "-q"]


@pytest.fixture
def _cifar(generated):
    """MODEL arguments of a random-weight CIFAR ResNet (the dataset mechanics need no trained model)."""
    return lambda depth=20: random_cifar(generated, depth)


@pytest.mark.parametrize(
    ("spec", "weights", "imgsz"),
    [("models/yolo11n-pose.pt", None, 96), ("models/yolo11n-person.pt", None, 96),
     ("cifar-resnet20", "models/cifar10-resnet20.th", 32), ("torchvision:resnet18", None, 64)],
)
def test_batchnorm_statistics_loss_falls_substantially(spec, weights, imgsz):
    if spec.startswith("models/"):
        spec = str(shared_asset(spec))
    adapter = load_model(spec, str(shared_asset(weights)) if weights else None)
    if weights is None and ":" in spec:  # random torchvision weights: BatchNorm statistics of real photos
        photos = load_data(shared_asset("data/photos"))
        for bn in (m for m in adapter.model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        with torch.no_grad():
            adapter.model.train()(adapter.input_spec.normalize(next(photos.batches(imgsz, 16))))
        adapter.model.eval()
    settings = SynthesisSettings(low_res_iterations=10, iterations=30, class_weight=0.0)
    images, stats = synthesize_batch(adapter.split(), adapter.input_spec, settings, count=4, imgsz=imgsz, seed=0, device=torch.device("cpu"))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, imgsz, imgsz)
    assert stats["bn_loss_end"] < 0.7 * stats["bn_loss_start"], stats


def test_dataset_is_valid_with_balanced_labels_and_preview(run_cli, tmp_path, _cifar):
    out = tmp_path / "synth"
    result = run_cli("synthesize", *_cifar(), "--out", out, "--num-images", "10", "--batch", "4", "--precision", "fp32", "--json", *TINY)
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_images"] == 10
    dataset = SyntheticDataset.open(out)
    dataset.verify()
    images, labels = dataset.load()
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == list(range(10))  # balanced: one per class
    assert [s["count"] for s in dataset.manifest["shards"]] == [4, 4, 2]
    assert {s["precision"] for s in dataset.manifest["shards"]} == {"fp32"}  # as asked, whatever the CPU has
    assert dataset.manifest["teacher"]["fingerprint"] == load_model(_cifar()[0], _cifar()[2]).fingerprint()
    assert (out / "preview.png").stat().st_size > 0
    assert not list(out.glob(".*partial*"))


def test_interrupted_run_resumes_to_the_same_images(run_cli, tmp_path, monkeypatch, _cifar):
    reference = tmp_path / "reference"
    assert run_cli("synthesize", *_cifar(), "--out", reference, "--num-images", "6", "--batch", "2", *TINY).code == 0

    interrupted = tmp_path / "interrupted"
    original_add = SyntheticDataset.add_shard
    calls = {"n": 0}

    def add_then_die(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second shard is being written
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(SyntheticDataset, "add_shard", add_then_die)
    assert run_cli("synthesize", *_cifar(), "--out", interrupted, "--num-images", "6", "--batch", "2", *TINY).code == 130
    monkeypatch.setattr(SyntheticDataset, "add_shard", original_add)
    assert SyntheticDataset.open(interrupted).num_images == 2  # the finished shard survived, valid

    assert run_cli("synthesize", *_cifar(), "--out", interrupted, "--num-images", "6", "--batch", "2", *TINY).code == 0
    resumed = SyntheticDataset.open(interrupted)
    assert [s["file"] for s in resumed.manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in interrupted.iterdir()) == sorted([".dfbf.lock", "dataset.json", "preview.png",  # the writers' lock stays
                                                                    *(s["file"] for s in resumed.manifest["shards"])])
    torch.testing.assert_close(resumed.load()[0], SyntheticDataset.open(reference).load()[0], rtol=0, atol=0)


def test_more_images_append_and_other_settings_are_refused(run_cli, tmp_path, _cifar):
    out = tmp_path / "synth"
    assert run_cli("synthesize", *_cifar(), "--out", out, "--num-images", "4", "--batch", "4", *TINY).code == 0
    first = SyntheticDataset.open(out).manifest["shards"][0]["sha256"]
    assert run_cli("synthesize", *_cifar(), "--out", out, "--num-images", "8", "--batch", "4", *TINY).code == 0
    grown = SyntheticDataset.open(out)
    assert grown.num_images == 8 and grown.manifest["shards"][0]["sha256"] == first

    other = run_cli("synthesize", *_cifar(), "--out", out, "--num-images", "8", "--imgsz", "24", *TINY)
    assert other.code == 2 and "other settings" in other.stderr and "imgsz" in other.stderr
    wrong_teacher = run_cli("synthesize", *_cifar(56), "--out", out, "--num-images", "12", *TINY)
    assert wrong_teacher.code == 2 and "synthesised from cifar-resnet20" in wrong_teacher.stderr


def test_reader_refuses_another_teacher_unless_overridden(run_cli, tmp_path, _cifar):
    out = tmp_path / "synth"
    assert run_cli("synthesize", *_cifar(), "--out", out, "--num-images", "2", "--batch", "2", *TINY).code == 0
    dataset = SyntheticDataset.open(out)
    other = load_model(_cifar(56)[0], _cifar(56)[2]).fingerprint()
    with pytest.raises(DfbfError, match="allow-teacher-mismatch"):
        dataset.check_teacher(other, allow_mismatch=False)
    dataset.check_teacher(other, allow_mismatch=True)


def test_corrupt_shard_is_named_clearly(run_cli, tmp_path, _cifar):
    out = tmp_path / "synth"
    assert run_cli("synthesize", *_cifar(), "--out", out, "--num-images", "4", "--batch", "2", *TINY).code == 0
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, e.g. by a full disk
    info = run_cli("synthesize", "--info", out)
    assert info.code == 2 and "shard-00001.safetensors" in info.stderr and "corrupt" in info.stderr
    with pytest.raises(DfbfError, match="shard-00001"):
        SyntheticDataset.open(out).load()


def test_info_describes_a_dataset_as_json(run_cli, tmp_path, _cifar):
    out = tmp_path / "synth"
    assert run_cli("synthesize", *_cifar(), "--out", out, "--num-images", "2", "--batch", "2", *TINY).code == 0
    report = json.loads(run_cli("synthesize", "--info", out, "--json").stdout)
    assert report["num_images"] == 2 and report["manifest"]["imgsz"] == 32
    assert report["manifest"]["generation"]["iterations"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["synthesize", "cifar-resnet20", "--out", "{out}", "--preset", "huge"], "'huge' is not one of"),
        (["synthesize", "cifar-resnet20"], "--out"),
        (["synthesize", "--info", "{nowhere}"], "not a dfbf synthetic dataset"),
        (["synthesize", "cifar-resnet20", "--out", "{not_empty}"], "not a dfbf synthetic dataset"),
        (["synthesize", "cifar-resnet20", "--out", "{out}", "--batch", "1"], "batch"),
    ],
)
def test_synthesize_user_mistakes_exit_2(run_cli, tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("mine")
    paths = {"out": tmp_path / "new", "nowhere": tmp_path / "nowhere", "not_empty": tmp_path / "full"}
    result = run_cli(*[a.format(**paths) for a in args])
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_optimisation_is_in_pixels_whatever_the_input_normalisation():
    """Two models that compute the same function of the pixels, one fed raw [0, 1] pixels (like YOLO),
    one ImageNet-normalised inputs, must get the same images: same noise, same steps, same priors."""
    torch.manual_seed(0)
    raw = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8))
    for bn in (raw[1], raw[4]):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    normalised = copy.deepcopy(raw)
    mean, std = (m.view(3) for m in IMAGENET.moments(torch.zeros(1)))
    with torch.no_grad():  # conv(x * std + mean) == conv'(x): fold the normalisation into the 1×1 conv
        normalised[0].bias += (raw[0].weight[:, :, 0, 0] * mean).sum(1)
        normalised[0].weight *= std.view(1, 3, 1, 1)
    settings = SynthesisSettings(low_res_iterations=2, iterations=4, jitter=0, flip=False, class_weight=0.0)
    made = [synthesize_batch(BackboneSplit(model, torch.nn.Identity(), []), spec, settings, count=4, imgsz=16, seed=0, device=torch.device("cpu"),
                             precision="fp32")[0]  # an exact comparison: bf16 rounding would differ between the two foldings
            for model, spec in ((raw, InputSpec(imgsz=16)), (normalised, IMAGENET))]
    assert made[0].float().std() > 10  # not a blank image
    assert (made[0].int() - made[1].int()).abs().max() <= 1
