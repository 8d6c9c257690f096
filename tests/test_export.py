"""Data-free INT8: exports to OpenVINO and ONNX calibrated on synthetic images, scored by dfbf eval and,
for YOLO, usable by stock Ultralytics without dfbf."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dfbf_cli.adapters import load_model
from dfbf_cli.engine.export import calibration_images
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.images import save_images
from tests.fixtures import labelled_npz

pytest.importorskip("openvino", reason="needs the export extra: pip install 'dfbf[export]'")
pytest.importorskip("onnxruntime", reason="needs the export extra: pip install 'dfbf[export]'")
QUIET = ["--device", "cpu", "-q"]


def _json(result) -> dict:
    assert result.code == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def r20_synthetic(tmp_path_factory):
    """A random ResNet-20 and 8 synthetic images of it."""
    from dfbf_cli.engine.synthesis import plan_synthesis, run_synthesis
    from dfbf_cli.settings import Precision, SynthesisSettings
    from tests.conftest import random_cifar

    folder = tmp_path_factory.mktemp("export")
    spec = random_cifar(folder, 20)
    adapter = load_model(spec[0], spec[2])
    plan = plan_synthesis(adapter, folder / "synth", num_images=8, imgsz=32, batch=4, settings=SynthesisSettings(0, 3), seed=0, precision=Precision.FP32)
    run_synthesis(adapter, plan, device=torch.device("cpu"))
    return spec, folder / "synth"


def test_calibration_images_are_spread_across_the_synthetic_set(r20_synthetic):
    _, synthetic = r20_synthetic
    dataset = SyntheticDataset.open(synthetic)
    every, few = calibration_images(dataset), calibration_images(dataset, limit=3)
    assert every.shape == (8, 3, 32, 32) and every.dtype == torch.uint8
    assert torch.equal(few, every[[0, 4, 7]])  # first, middle, last: both shards


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_classifier_exports_int8_and_agrees_with_itself(run_cli, tmp_path, r20_synthetic, fmt):
    spec, synthetic = r20_synthetic
    out = tmp_path / ("r20_int8_openvino_model" if fmt == "openvino" else "r20-int8.onnx")
    made = _json(run_cli("export", *spec, "--format", fmt, "--int8", "--synthetic", synthetic, "--out", out, "--json", *QUIET))
    assert made["int8"] and out.exists()
    data = labelled_npz(tmp_path / "test.npz")
    report = _json(run_cli("eval", *spec[:1], "--weights", spec[2], "--data", data, "--json", "--latency-runs", "2", *QUIET))
    exported = _json(run_cli("eval", out, "--data", data, "--json", "--latency-runs", "2", *QUIET))
    original, int8 = report["models"][0], exported["models"][0]
    assert int8["efficiency"]["params"] == original["efficiency"]["params"] and int8["efficiency"]["gflops"] == original["efficiency"]["gflops"]
    assert int8["efficiency"]["file_mb"] < 0.5 * original["efficiency"]["file_mb"]  # 8-bit weights
    teacher = ["--teacher", spec[0], "--teacher-weights", spec[2]]
    photos = tmp_path / "photos"
    save_images(SyntheticDataset.open(synthetic).load()[0], photos, "s")
    agreement = _json(run_cli("eval", out, *teacher, "--data", photos, "--json", "--latency-runs", "1", *QUIET))
    assert agreement["models"][0]["metrics"]["agreement_top1"] >= 50  # INT8 follows its FP32 original on its own images


def test_agreement_is_perfect_for_the_model_itself_and_falls_for_a_damaged_copy(tmp_path, r20_synthetic):
    from dfbf_cli.engine.export import _pictures, held_out_split

    spec, synthetic = r20_synthetic
    model = load_model(spec[0], spec[2])
    calibration, held_out = held_out_split(SyntheticDataset.open(synthetic).load()[0])
    assert (len(calibration), len(held_out)) == (6, 2)
    pictures = _pictures(tmp_path / "held-out", held_out)
    itself = model.agreement(model, pictures, imgsz=32, batch=2, device=torch.device("cpu"))
    assert itself["agreement_top1"] == 100.0 and itself["agreement_kl"] == pytest.approx(0.0, abs=1e-6)
    damaged = load_model(spec[0], spec[2])
    last = [m for m in damaged.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.add_(torch.randn_like(last.weight))
    assert damaged.agreement(model, pictures, imgsz=32, batch=2, device=torch.device("cpu"))["agreement_kl"] > 1e-3


@pytest.mark.slow
def test_int8_auto_keeps_the_recipe_that_agrees_best_and_records_what_stayed_in_fp(run_cli, tmp_path, r20_synthetic):
    spec, synthetic = r20_synthetic
    out = tmp_path / "r20_int8_openvino_model"
    made = _json(run_cli("export", *spec, "--format", "openvino", "--int8", "--synthetic", synthetic, "--out", out, "--json", *QUIET))
    record = json.loads((out / "dfbf.json").read_text())
    quantised = record["int8"]
    assert made["int8_recipe"] == quantised and record["calibration"]["images"] == 6 and quantised["held_out_images"] == 2
    scores = {recipe: values["agreement_top1"] for recipe, values in quantised["agreement"].items()}
    assert set(scores) == {"mixed", "outputs-fp", "bias-correction"} and scores[quantised["recipe"]] == max(scores.values())
    fixed = _json(run_cli("export", *spec, "--format", "openvino", "--int8", "--synthetic", synthetic, "--int8-recipe", "outputs-fp",
                          "--out", tmp_path / "fixed_openvino_model", "--json", *QUIET))["int8_recipe"]
    assert fixed["recipe"] == "outputs-fp" and list(fixed["agreement"]) == ["outputs-fp"]
    assert any("MatMul" in name for name in fixed["kept_fp"])  # the classifier's last layer writes its output


@pytest.mark.slow
def test_int8_without_synthetic_makes_its_own_calibration_set_and_reuses_it(run_cli, tmp_path, random_r20, monkeypatch):
    import dfbf_cli.engine.export as engine_export

    monkeypatch.setattr(engine_export, "CALIBRATION_SET_IMAGES", 8)  # the real 32 take longer, nothing else differs
    monkeypatch.chdir(tmp_path)
    made = _json(run_cli("export", *random_r20, "--format", "onnx", "--int8", "--json", *QUIET))
    (own,) = tmp_path.glob("r20-random-*-synthetic-32px")
    dataset = SyntheticDataset.open(own)
    assert dataset.num_images == 8 and dataset.manifest["imgsz"] == 32 and (tmp_path / made["calibration"]["synthetic"]).resolve() == own.resolve()
    assert made["calibration"]["images"] == 6 and made["int8_recipe"]["held_out_images"] == 2
    shards = sorted(p.name for p in own.iterdir())
    again = _json(run_cli("export", *random_r20, "--format", "onnx", "--int8", "--json", *QUIET))
    assert again["calibration"] == made["calibration"] and sorted(p.name for p in own.iterdir()) == shards


@pytest.mark.slow
def test_yolo_int8_openvino_export_is_a_stock_ultralytics_model(run_cli, tmp_path, random_pose):
    model, data = random_pose
    synthetic = tmp_path / "synth"
    assert run_cli("synthesize", model, "--out", synthetic, "--num-images", "4", "--batch", "4", "--iterations", "2", "--low-res-iterations", "0",
                   *QUIET).code == 0
    out = tmp_path / "pose_int8_openvino_model"
    _json(run_cli("export", model, "--format", "openvino", "--int8", "--synthetic", synthetic, "--out", out, "--json", *QUIET))
    assert (out / "model.xml").exists() and (out / "dfbf.json").exists()
    record = json.loads((out / "dfbf.json").read_text())
    assert record["precision"] == "int8" and record["calibration"]["images"] == 4
    keypoint_branch = [name for name in record["int8"]["kept_fp"] if ".cv4." in name and "Convolution" in name]
    assert len(keypoint_branch) == 3 and all(".cv4.2." in name for name in keypoint_branch)  # the coarsest stride's, of three, stays in FP
    scored = _json(run_cli("eval", out, "--data", data, "--json", "--latency-runs", "1", *QUIET))
    assert set(scored["models"][0]["metrics"]) == {"pose_map50_95", "pose_map50", "box_map50_95", "box_map50"}
    script = (
        "import sys, numpy as np\n"
        "from ultralytics import YOLO\n"
        f"model = YOLO({str(out)!r})\n"
        "results = model.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)\n"
        f"metrics = model.val(data={str(data)!r}, imgsz=64, batch=1, plots=False, verbose=False, workers=0)\n"
        "assert 'dfbf_cli' not in sys.modules and results[0].keypoints is not None\n"
        "print('pose-map', metrics.results_dict['metrics/mAP50-95(P)'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=data.parent)
    assert done.returncode == 0 and "pose-map" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_compress_exports_the_compressed_model_and_scores_it_beside_the_others(run_cli, tmp_path, random_r20, quick_synthesis):
    data = labelled_npz(tmp_path / "test.npz")
    report = _json(run_cli("compress", *random_r20, "--ratio", "0.5", "--preset", "quick", "--num-images", "8", "--epochs", "1", "--data", data,
                           "--export", "onnx", "--int8", "--out", tmp_path / "run", "--json", *QUIET))
    assert (tmp_path / "run" / "compressed-int8.onnx").exists()
    assert list(report["models"]) == ["original", "pruned", "compressed", "compressed INT8 onnx"]


@pytest.mark.slow
def test_compress_int8_calibrates_at_the_export_size(run_cli, tmp_path, random_pose, monkeypatch):
    import dfbf_cli.engine.export as engine_export
    from dfbf_cli.settings import PRESETS, Preset, PresetName, SynthesisSettings

    few_steps = SynthesisSettings(low_res_iterations=0, iterations=1)  # the real sets take longer, nothing else differs
    monkeypatch.setattr(engine_export, "CALIBRATION_SET_IMAGES", 4)
    monkeypatch.setattr(engine_export, "CALIBRATION_SYNTHESIS", few_steps)
    monkeypatch.setitem(PRESETS, PresetName.QUICK, Preset(4, 4, 64, few_steps, 4, 4))
    model, _ = random_pose
    run = tmp_path / "run"
    _json(run_cli("compress", model, "--ratio", "0.3", "--preset", "quick", "--num-images", "4", "--imgsz", "32", "--epochs", "1",
                  "--export", "openvino", "--int8", "--out", run, "--json", *QUIET))
    assert SyntheticDataset.open(run / "synthetic").manifest["imgsz"] == 32
    calibration = SyntheticDataset.open(run / "calibration")
    assert calibration.manifest["imgsz"] == 64 and calibration.num_images == 4  # the model's (and the export's) size
    record = json.loads((run / "compressed_int8_openvino_model" / "dfbf.json").read_text())
    assert record["imgsz"] == 64 and record["calibration"]["synthetic"] == str(run / "calibration")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "'tflite' is not one of"),
        (["--format", "onnx", "--int8", "--synthetic", "{synthetic}", "--int8-recipe", "outputs-fp"], "needs --int8 --format openvino"),
        (["--format", "onnx", "--synthetic", "{synthetic}"], "add --int8"),
        (["--format", "onnx", "--int8", "--synthetic", "{other}"], "--allow-teacher-mismatch"),
        (["--format", "onnx", "--out", "{folder}"], "existing directory"),
        (["--format", "openvino", "--out", "{folder}"], "not a dfbf export"),
        (["--format", "onnx", "--out", "{folder}/../model.bin"], "ends in .onnx"),
    ],
)
def test_export_mistakes_exit_2_and_write_nothing(run_cli, tmp_path, r20_synthetic, args, message):
    spec, synthetic = r20_synthetic
    from tests.conftest import random_cifar
    from tests.test_hardening import _synthesize

    other = _synthesize(random_cifar(tmp_path, 56), tmp_path / "other")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("a user's file")
    before = sorted(p.name for p in tmp_path.iterdir())
    paths = {"synthetic": synthetic, "other": other, "folder": tmp_path / "folder"}
    result = run_cli("export", *spec, *[a.format(**paths) for a in args], *QUIET)
    assert result.code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "folder" / "mine.txt").read_text() == "a user's file"


def test_a_missing_runtime_names_the_extra_to_install(run_cli, r20_synthetic, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    spec, synthetic = r20_synthetic
    result = run_cli("export", *spec, "--format", "openvino", "--int8", "--synthetic", synthetic, *QUIET)
    assert result.code == 2 and "nncf" in result.stderr and 'pip install "dfbf[export]"' in result.stderr


def test_a_yolo_openvino_export_under_a_name_ultralytics_would_not_recognise_is_refused(run_cli, tmp_path, random_pose):
    model, _ = random_pose
    result = run_cli("export", model, "--format", "openvino", "--out", tmp_path / "mine", *QUIET)
    assert result.code == 2 and "mine_openvino_model" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
