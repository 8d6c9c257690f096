"""``dfbf eval`` end to end: real numbers, JSON that matches the table, and clear errors with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dfbf_cli.adapters import load_model
from dfbf_cli.settings import Scope
from tests.conftest import pruned_copy, shared_asset


def _json(result) -> dict:
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


COMMANDS = ("compress", "synthesize", "prune", "finetune", "eval")


def test_version_and_help_list_working_commands(run_cli):
    assert run_cli("--version").stdout.startswith("dfbf ")
    help_text = run_cli("--help").stdout
    for command in COMMANDS:
        assert command in help_text
        page = run_cli(command, "--help")
        assert page.code == 0 and f" {command} [OPTIONS]" in page.stdout and "--json" in page.stdout


def test_pose_map_matches_ultralytics_own_validation_on_square_inputs(run_cli, dataset_copy, monkeypatch):
    from ultralytics import YOLO

    data = dataset_copy("coco8-pose")
    model = shared_asset("models/yolo11n-pose.pt")
    monkeypatch.chdir(data.parent)  # where Ultralytics resolves the YAML's "path: ." for a user
    reference = YOLO(str(model)).val(data=str(data), imgsz=640, batch=16, device="cpu", plots=False, verbose=False, rect=False,
                                     project=str(data.parent / "runs"), workers=0)
    report = _json(run_cli("eval", model, "--data", data, "--device", "cpu", "--json", "--latency-runs", "1"))
    metrics = report["models"][0]["metrics"]
    assert round(metrics["pose_map50_95"], 3) == round(reference.results_dict["metrics/mAP50-95(P)"], 3)
    assert round(metrics["box_map50_95"], 3) == round(reference.results_dict["metrics/mAP50-95(B)"], 3)
    assert metrics["pose_map50_95"] > 0.3  # a real model, not a broken one


@pytest.mark.parametrize(("depth", "low", "high"), [(56, 81.5, 85.0)])  # ResNet-20's weights: read by the progressive and FGSM tests
def test_cifar_resnets_reach_their_recorded_accuracy(run_cli, tmp_path, depth, low, high):
    with np.load(shared_asset("data/cifar10-test-dev.npz")) as archive:  # half B, class-balanced: ResNet-56 scores 83.04 there (docs/export.md)
        x, y = archive["x"], archive["y"]
    half_b = np.concatenate([np.flatnonzero(y == c)[(y == c).sum() // 2 :] for c in range(10)])
    np.savez(tmp_path / "half_b.npz", x=x[half_b], y=y[half_b])
    report = _json(run_cli(
        "eval", f"cifar-resnet{depth}", "--weights", shared_asset(f"models/cifar10-resnet{depth}.th"),
        "--data", tmp_path / "half_b.npz", "--batch", "500", "--json", "--latency-runs", "1",
    ))
    model = report["models"][0]
    assert low < model["metrics"]["top1"] < high
    assert model["efficiency"]["params"] == model["efficiency"]["backbone_params"] + 650  # linear 64→10 is the head


def test_json_carries_the_numbers_of_the_table(run_cli, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 12))
    args = ["eval", "cifar-resnet20", "--data", tmp_path / "tiny.npz", "--latency-runs", "1", "--device", "cpu"]
    table = run_cli(*args)
    report = _json(run_cli(*args, "--json"))
    model = report["models"][0]
    assert report["command"] == "eval" and report["device"] == "cpu"
    assert f"{model['metrics']['top1']:.2f}" in table.stdout
    assert f"{model['efficiency']['params'] / 1e6:.3f}" in table.stdout
    assert f"{model['efficiency']['gflops']:.2f}" in table.stdout


def test_person_detector_evaluates_on_person_data_and_refuses_80_classes(run_cli, dataset_copy):
    model = shared_asset("models/yolo11n-person.pt")
    report = _json(run_cli("eval", model, "--data", dataset_copy("coco8-person"), "--json", "--latency-runs", "1", "-q"))
    assert report["models"][0]["task"] == "detect" and report["models"][0]["metrics"]["box_map50_95"] > 0.1
    mismatch = run_cli("eval", model, "--data", dataset_copy("coco8"))
    assert mismatch.code == 2 and "1 class(es)" in mismatch.stderr and "has 80" in mismatch.stderr


def test_classifier_agreement_with_teacher_on_photos(run_cli, tmp_path):
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / f"photo{i}.png")
    weights = shared_asset("models/cifar10-resnet20.th")
    common = ["--teacher", "cifar-resnet20", "--teacher-weights", weights, "--data", tmp_path, "--json", "--latency-runs", "1"]
    same = _json(run_cli("eval", "cifar-resnet20", "--weights", weights, *common))
    assert same["models"][0]["metrics"]["agreement_top1"] == 100.0
    pruned = tmp_path / "pruned.th"
    pruned_copy(load_model("cifar-resnet20", str(weights)), 0.9).save(pruned)
    for i in range(3, 20):  # more varied images, so that a broken model disagrees somewhere
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"photo{i}.png")
    other = _json(run_cli("eval", "cifar-resnet20", "--weights", pruned, *common))
    assert other["models"][0]["metrics"]["agreement_top1"] < 90.0


def test_yolo_agreement_is_high_for_the_teacher_itself_and_low_for_a_pruned_copy(run_cli, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(shared_asset("data/photos").iterdir())[:6]:
        (photos / path.name).symlink_to(path)
    model = shared_asset("models/yolo11n-pose.pt")
    pruned = pruned_copy(load_model(str(model)), 0.3).save(tmp_path / "pruned.pt")
    report = _json(run_cli("eval", model, pruned, "--teacher", model, "--data", photos, "--imgsz", "320", "--json", "--latency-runs", "1", "-q"))
    itself, copy = (m["metrics"]["agreement_pose_map50_95"] for m in report["models"])
    assert itself > 0.5 and copy < itself - 0.2
    assert report["free_alternative"] == []  # agreement is not a labelled metric: no free-alternative column


def test_eval_puts_a_cheaper_yolo_model_beside_the_original_at_equal_gflops(run_cli, tmp_path, dataset_copy):
    model = shared_asset("models/yolo11n-pose.pt")
    pruned = pruned_copy(load_model(str(model)), 0.3).save(tmp_path / "pruned.pt")
    report = _json(run_cli("eval", model, pruned, "--data", dataset_copy("coco8-pose"), "--json", "--latency-runs", "1", "-q"))
    names = [m["name"] for m in report["models"]]
    assert names == ["yolo11n-pose.pt", "pruned.pt", "yolo11n-pose.pt @ 608 px"]  # 7.47 × (608/640)² ≈ 6.74 GFLOPs, nearest to 6.55
    verdict = report["free_alternative"][0]
    assert verdict["baseline_imgsz"] == 608 and verdict["pays"] is False  # an untrained pruned model loses to a free input size
    assert abs(verdict["baseline_gflops"] / verdict["compressed_gflops"] - 1) < 0.05


def test_eval_free_alternative_on_generated_data(run_cli, random_pose, tmp_path):
    model, data = random_pose
    pruned = pruned_copy(load_model(str(model)), 0.5, Scope.TRUNK).save(tmp_path / "pruned.pt")
    report = _json(run_cli("eval", model, pruned, "--data", data, "--json", "--latency-runs", "1", "-q"))
    assert len(report["models"]) == 3 and report["models"][2]["efficiency"]["imgsz"] == 32
    assert set(report["models"][0]["metrics"]) == {"pose_map50_95", "pose_map50", "box_map50_95", "box_map50"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "missing.pt", "--data", "{npz}"], "could not be downloaded"),
        (["eval", "resnet18", "--data", "{npz}"], "Unknown model"),
        (["eval", "cifar-resnet20", "--data", "nowhere.npz"], "does not exist"),
        (["eval", "cifar-resnet20", "--data", "{bad_npz}"], "must hold arrays"),
        (["eval", "cifar-resnet20", "--data", "{txt}"], "neither a dataset YAML nor an .npz"),
        (["eval", "cifar-resnet20", "--data", "{empty_dir}"], "holds no images"),
        (["eval", "cifar-resnet20", "--data", "{npz}", "--device", "tpu"], "Unknown device"),
        (["eval", "cifar-resnet20", "--data", "{npz}", "--device", "cuda:7"], "cuda:7"),
        (["eval", "cifar-resnet20", "--data", "{photos}"], "--teacher"),
        (["eval", "yolov8n.yaml", "--data", "{npz}"], "dataset YAML"),
        (["eval", "cifar-resnet20", "--data", "{npz}", "--batch", "0"], "batch"),
    ],
)
def test_user_mistakes_exit_2_with_one_clear_sentence(run_cli, tmp_path, args, message):
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.uint8))
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    paths = {"npz": tmp_path / "ok.npz", "bad_npz": tmp_path / "bad.npz", "txt": tmp_path / "notes.txt",
             "empty_dir": tmp_path / "empty", "photos": tmp_path / "photos"}
    result = run_cli(*[a.format(**paths) for a in args])
    assert result.code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_latency_is_timed_one_runtime_after_another(monkeypatch):
    """An exported model is never timed round-robin with a PyTorch one (PyTorch's spinning threads slow it)."""
    import torch

    from dfbf_cli.adapters.classifier import ExportedClassifier
    from dfbf_cli.contract import Exported
    from dfbf_cli.engine import efficiency

    torch_model = load_model("cifar-resnet20")
    exported = ExportedClassifier.__new__(ExportedClassifier)  # a stand-in: a PyTorch module behind the exported adapter's type
    exported.__dict__.update(vars(load_model("cifar-resnet20")), record={"source": {"params": 1, "backbone_params": 1, "gflops": 0.1}})
    assert isinstance(exported, Exported)
    blocks = []
    monkeypatch.setattr(efficiency, "median_latencies_ms", lambda models, examples, runs: blocks.append(list(models)) or [len(blocks)] * len(models))
    monkeypatch.setattr(efficiency, "file_size_mb", lambda adapter: 0.0)
    monkeypatch.setattr(efficiency, "RUNTIME_PAUSE_S", 0.0)
    reports = efficiency.measure_efficiency([(torch_model, 32), (exported, 32), (torch_model, 32)], device=torch.device("cpu"), runs=1)
    assert [len(b) for b in blocks] == [2, 1]
    assert [r.latency_cpu_ms for r in reports] == [1, 2, 1]
