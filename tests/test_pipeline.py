"""The whole pipeline on generated inputs alone (random-weight models, generated data): what a
contributor without ../shared runs. synthesize → prune → finetune → compress → resume, for a
classifier and for YOLO pose, segment and OBB models, with the trunk scope and a GFLOPs target."""

from __future__ import annotations

import json

import pytest
import torch

import dfbf_cli.engine.compress as compress_module
from dfbf_cli.adapters import load_model
from dfbf_cli.engine.efficiency import gflops
from dfbf_cli.settings import Scope
from tests.conftest import stock_ultralytics_predicts
from tests.fixtures import labelled_npz, one_class_yolo, photos, yolo_dataset

QUIET = ["--device", "cpu", "-q"]
TINY_SYNTHESIS = ["--iterations", "3", "--low-res-iterations", "2"]


def _json(result) -> dict:
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_classifier_pipeline_stage_by_stage(run_cli, tmp_path, random_r20):
    synthetic = tmp_path / "synth"
    made = _json(run_cli("synthesize", *random_r20, "--out", synthetic, "--num-images", "16", "--batch", "8", *TINY_SYNTHESIS, "--json", *QUIET))
    assert made["num_images"] == 16
    pruned = tmp_path / "pruned.safetensors"
    report = _json(run_cli("prune", *random_r20, "--flops", "0.6", "--out", pruned, "--latency-runs", "1", "--json", *QUIET))
    assert report["after"]["gflops"] <= 0.6 * report["before"]["gflops"]
    tuned = tmp_path / "tuned.safetensors"
    history = _json(run_cli("finetune", pruned, "--teacher", random_r20[0], "--teacher-weights", random_r20[2], "--data", synthetic,
                            "--out", tuned, "--epochs", "6", "--batch", "8", "--json", *QUIET))["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    student, teacher = load_model(str(tuned)), load_model(random_r20[0], random_r20[2])
    assert torch.equal(student.model.linear.weight, teacher.model.linear.weight)  # the head is the original's
    data = labelled_npz(tmp_path / "test.npz")
    scored = _json(run_cli("eval", random_r20[0], "--weights", random_r20[2], "--data", data, "--json", "--latency-runs", "1", *QUIET))
    assert 0 <= scored["models"][0]["metrics"]["top1"] <= 100 and scored["free_alternative"] == []  # a classifier has no free input size


@pytest.mark.slow
def test_compress_resumes_after_an_interruption_to_the_same_model(run_cli, tmp_path, random_r20, monkeypatch, quick_synthesis):
    args = ["compress", *random_r20, "--ratio", "0.5", "--preset", "quick", "--num-images", "16", "--epochs", "4", "--precision", "fp32", *QUIET]
    reference = tmp_path / "reference"
    assert run_cli(*args, "--out", reference).code == 0

    real_finetune, calls = compress_module.finetune, {"n": 0}

    def finetune_then_die(*a, **k):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_module, "finetune", finetune_then_die)
    run = tmp_path / "run"
    assert run_cli(*args, "--out", run).code == 130
    assert (run / "pruned.safetensors").exists() and not (run / "compressed.safetensors").exists()
    stamp = (run / "pruned.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(compress_module, "finetune", real_finetune)
    assert run_cli(*args, "--out", run).code == 0
    assert (run / "pruned.safetensors").stat().st_mtime_ns == stamp  # the finished stage was kept
    for a, b in zip(load_model(str(run / "compressed.safetensors")).model.state_dict().values(),
                    load_model(str(reference / "compressed.safetensors")).model.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_yolo_compress_to_a_gflops_target_in_the_trunk_without_data(run_cli, tmp_path, random_pose, quick_synthesis):
    model, _ = random_pose
    run = tmp_path / "run"
    report = _json(run_cli("compress", model, "--flops", "0.7", "--scope", "trunk", "--allocation", "sensitivity", "--rounds", "2",
                           "--preset", "quick", "--num-images", "8", "--epochs", "2", "--out", run, "--json", *QUIET))
    original, compressed = load_model(str(model)), load_model(str(run / "compressed.pt"))
    x = torch.zeros(1, 3, 64, 64)
    assert gflops(compressed.model, x) <= 0.7 * gflops(original.model, x)
    assert (run / "round-1.pt").exists() and len(report["finetune_history"]) == 2  # two rounds of one epoch each
    one_shot = load_model(str(run / "pruned.pt"))  # the plan's channel counts cut at once
    assert [p.shape for p in compressed.model.parameters()] == [p.shape for p in one_shot.model.parameters()]  # two steps reach them exactly
    # without --data the report still says what was gained and how faithful the result is
    assert set(report["models"]) == {"original", "pruned", "compressed"} and report["metric_drop"] is None
    assert report["models"]["compressed"]["efficiency"]["gflops"] < report["models"]["original"]["efficiency"]["gflops"]
    fidelity = report["fidelity"]["feature_distance_on_fresh_synthetic_images"]
    assert set(fidelity) == {"pruned", "compressed"} and all(v >= 0 for v in fidelity.values())
    assert "Feature distance to the original" in (run / "report.md").read_text()
    head = original.split(Scope.TRUNK).head_modules
    for name in head:  # the task module is the original's, bit for bit
        for key, tensor in original.model.get_submodule(name).state_dict().items():
            assert torch.equal(tensor, compressed.model.get_submodule(name).state_dict()[key].float()), key
    stock_ultralytics_predicts(run / "compressed.pt", 64, "keypoints")


@pytest.mark.slow
@pytest.mark.parametrize(("task", "metric"), [("segment", "mask_map50_95"), ("obb", "box_map50_95"), ("detect", "box_map50_95")])
def test_segment_obb_and_detect_models_compress_and_score_with_their_own_metric(run_cli, tmp_path, task, metric, quick_synthesis):
    model, data = one_class_yolo(tmp_path, task), yolo_dataset(tmp_path / "data", task)
    report = _json(run_cli("compress", model, "--ratio", "0.3", "--scope", "trunk", "--preset", "quick", "--num-images", "4", "--epochs", "1", "--data", data,
                           "--out", tmp_path / "run", "--json", *QUIET))
    assert report["metric_drop"]["metric"] == metric and metric in report["models"]["compressed"]["metrics"]
    assert report["free_alternative"]["baseline_imgsz"] == 32
    compressed = load_model(str(tmp_path / "run" / "compressed.pt"))
    assert compressed.task == task
    teacher_photos = photos(tmp_path / "photos", count=3, size=64)
    agreement = _json(run_cli("eval", tmp_path / "run" / "compressed.pt", "--teacher", model, "--data", teacher_photos, "--json",
                              "--latency-runs", "1", *QUIET))
    assert f"agreement_{metric}" in agreement["models"][0]["metrics"]
