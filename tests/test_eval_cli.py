"""``dfbf eval`` end to end: real numbers, JSON that matches the table, and clear errors with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_asset


def _json(result) -> dict:
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_version_and_help_list_working_commands(run_cli):
    assert run_cli("--version").stdout.startswith("dfbf ")
    help_text = run_cli("--help").stdout
    assert "eval" in help_text


def test_pose_map_matches_ultralytics_own_validation(run_cli, dataset_copy, monkeypatch):
    from ultralytics import YOLO

    data = dataset_copy("coco8-pose")
    model = shared_asset("models/yolo11n-pose.pt")
    monkeypatch.chdir(data.parent)  # where Ultralytics resolves the YAML's "path: ." for a user
    reference = YOLO(str(model)).val(data=str(data), imgsz=640, batch=16, device="cpu", plots=False, verbose=False,
                                     project=str(data.parent / "runs"), workers=0)
    report = _json(run_cli("eval", model, "--data", data, "--device", "cpu", "--json", "--latency-runs", "1"))
    metrics = report["models"][0]["metrics"]
    assert round(metrics["pose_map50_95"], 3) == round(reference.results_dict["metrics/mAP50-95(P)"], 3)
    assert round(metrics["box_map50_95"], 3) == round(reference.results_dict["metrics/mAP50-95(B)"], 3)
    assert metrics["pose_map50_95"] > 0.3  # a real model, not a broken one


@pytest.mark.parametrize(("depth", "low", "high"), [(20, 79.0, 83.0), (56, 81.5, 85.0)])
def test_cifar_resnets_reach_their_recorded_accuracy(run_cli, depth, low, high):
    report = _json(run_cli(
        "eval", f"cifar-resnet{depth}", "--weights", shared_asset(f"models/cifar10-resnet{depth}.th"),
        "--data", shared_asset("data/cifar10-test-dev.npz"), "--batch", "500", "--json", "--latency-runs", "1",
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
