"""A careless or hostile user: every mistake is caught before the work, in one sentence with exit 2,
no input is ever changed, and no code runs from a file dfbf reads."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import random_cifar
from tests.fixtures import KPT_SHAPE, labelled_npz, one_class_yolo, photos, yolo_dataset

MARKER = "code-ran.marker"


class Exploit:
    """Unpickling this runs code: it writes the marker file named at construction."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _synthesize(model_args: list[str], out: Path, seed: int = 0) -> Path:
    """Four 32-px images in shards of two (fp32, 2 steps): a dataset to break in various ways."""
    from dfbf_cli.adapters import load_model
    from dfbf_cli.engine.synthesis import plan_synthesis, run_synthesis
    from dfbf_cli.settings import Precision, SynthesisSettings

    adapter = load_model(model_args[0], model_args[2])
    plan = plan_synthesis(adapter, out, num_images=4, imgsz=32, batch=2, settings=SynthesisSettings(0, 2), seed=seed, precision=Precision.FP32)
    run_synthesis(adapter, plan, device=torch.device("cpu"))
    return out


def _edit_manifest(folder: Path, edit) -> Path:
    manifest = json.loads((folder / "dataset.json").read_text())
    edit(manifest)
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Every input of the catalogue, made once: models, datasets, and broken variants of each."""
    root = tmp_path_factory.mktemp("inputs")
    r20, r56 = random_cifar(root, 20), random_cifar(root, 56)
    torch.save(load_file(r20[2]), root / "r20.pth")
    torch.save({"state_dict": Exploit(root / MARKER)}, root / "evil.pth")
    torch.save({"model": Exploit(root / MARKER), "train_args": {}}, root / "evil.pt")
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    synthetic = _synthesize(r20, root / "synth")
    _synthesize(r56, root / "synth-r56")
    for name, edit in (("count", lambda m: m["shards"][0].update(count=3)),
                       ("escape", lambda m: m["shards"][0].update(file="../../r20.pth")),
                       ("keys", lambda m: m.pop("imgsz"))):
        _edit_manifest(shutil.copytree(synthetic, root / f"synth-{name}"), edit)
    swapped = shutil.copytree(synthetic, root / "synth-dtype")
    save_file({"images": torch.zeros(2, 3, 32, 32, dtype=torch.float32), "labels": torch.zeros(2, dtype=torch.int64)}, str(swapped / "shard-00000.safetensors"))
    _edit_manifest(swapped, lambda m: m["shards"][0].update(sha256=hashlib.sha256((swapped / "shard-00000.safetensors").read_bytes()).hexdigest()))
    from dfbf_cli.adapters import load_model
    from tests.conftest import pruned_copy

    pruned_copy(load_model(r20[0], r20[2]), 0.5).save(root / "pruned.safetensors")
    yolo = one_class_yolo(root, "pose")
    data = yolo_dataset(root / "pose", "pose")
    for name in ("nolabels", "badlabel", "badimage", "emptyval", "kpt"):
        shutil.copytree(root / "pose", root / name)
    shutil.rmtree(root / "nolabels" / "labels")
    (root / "badlabel" / "labels" / "val" / "im0.txt").write_text("0 0.5 0.5 banana\n")
    (root / "badimage" / "images" / "val" / "im1.png").write_bytes(b"\x89PNG broken")
    for image in (root / "emptyval" / "images" / "val").iterdir():
        image.unlink()
    (root / "kpt" / "data.yaml").write_text((root / "kpt" / "data.yaml").read_text().replace(f"- {KPT_SHAPE[0]}", "- 5"))
    (root / "bad.yaml").write_text("val: [unclosed\n")
    labelled_npz(root / "ok.npz")
    np.savez(root / "empty.npz", x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, np.int64))
    np.savez(root / "labels2d.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros((4, 2), np.int64))
    np.savez(root / "labelstr.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array(["cat"] * 4))
    photos(root / "photos", count=3, size=32)
    shutil.copytree(root / "photos", root / "photos-broken")
    (root / "photos-broken" / "photo9.png").write_bytes(b"broken")
    (root / "folder").mkdir()
    (root / "folder" / "mine.txt").write_text("a user's file")
    (root / "notes.txt").write_text("a file where a folder belongs")
    (root / "link.safetensors").symlink_to("r20-random.safetensors")  # relative: the copy's links point into the copy
    (root / "link.onnx").symlink_to("r20-random.safetensors")
    (root / "synth-link").symlink_to("synth-r56", target_is_directory=True)
    (root / "empty-photos").mkdir()
    shutil.copytree(root / "photos", root / "photos-odd")
    (root / "photos-odd" / "fötø ✓.png").write_bytes(b"not an image, and a name in UTF-8")
    (root / "truncated-run").mkdir()
    (root / "truncated-run" / "run.json").write_text('{"dfbf_version": "0.1", "requ')
    return root, r20, yolo, data


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


R20 = ["cifar-resnet20", "--weights", "{in}/r20-random.safetensors"]
TEACHER = ["--teacher", "cifar-resnet20", "--teacher-weights", "{in}/r20-random.safetensors"]
TUNE = ["finetune", "{in}/pruned.safetensors", *TEACHER, "--data", "{in}/synth"]
CATALOGUE = [
    # synthesize
    (["synthesize", *R20, "--out", "{in}/r20-random.safetensors"], "is --weights itself"),
    (["synthesize", *R20, "--out", "{in}/synth-r56"], "another model"),
    (["synthesize", *R20, "--out", "{in}/synth", "--num-images", "8", "--batch", "4", "--iterations", "2", "--low-res-iterations", "0",
      "--precision", "fp32"], "batch"),
    (["synthesize", *R20, "--out", "{in}/synth", "--num-images", "8", "--batch", "2", "--iterations", "2", "--low-res-iterations", "0",
      "--precision", "bf16"], "precision"),
    (["synthesize", "{yolo}", "--out", "{out}/s", "--imgsz", "100"], "not a multiple of"),
    (["synthesize", "{yolo}", "--out", "{out}/s", "--imgsz", "64000"], "GiB"),
    (["synthesize", "--info", "{in}/synth-count"], "disagrees"),
    (["synthesize", "--info", "{in}/synth-escape"], "not a shard of this folder"),
    (["synthesize", "--info", "{in}/synth-keys"], "damaged"),
    (["synthesize", "--info", "{in}/synth-dtype"], "does not hold what"),
    (["synthesize", "--info", "{in}/synth", "--out", "{out}/x"], "does not apply to --info"),
    (["synthesize", "cifar-resnet20", "--weights", "cifar10-resnet20", "--out", "{out}/s"], "is not a file"),
    (["synthesize", "torchvision:resnet18", "--weights", "IMAGENET_BEST", "--out", "{out}/s"], "neither a file nor a weights name"),
    (["synthesize", *R20, "--out", "{out}/s", "--seed", "99999999999999999999"], "--seed"),
    (["synthesize", *R20, "--out", "{in}/notes.txt"], "existing file"),
    # prune
    (["prune", *R20, "--ratio", "0.3", "--out", "{in}/r20-random.safetensors"], "is --weights itself"),
    (["prune", *R20, "--ratio", "0.3", "--out", "{in}/folder"], "existing directory"),
    (["prune", *R20, "--ratio", "0.3", "--out", "{in}/notes.txt/x.safetensors"], "is a file, not a directory"),
    (["prune", *R20, "--ratio", "0.3", "--steps", "3"], "applies to --strategy progressive"),
    (["prune", *R20, "--ratio", "0.3", "--synthetic", "{in}/synth"], "is read by"),
    (["prune", *R20, "--ratio", "0.3", "--dry-run", "--out", "{out}/x.safetensors"], "does not apply to --dry-run"),
    (["prune", *R20, "--flops", "0.01"], "cannot be reached"),
    (["prune", *R20, "--ratio", "0.3", "--strategy", "progressive", "--synthetic", "{in}/synth-r56"], "synthesised from cifar-resnet56"),
    (["prune", "{yolo}", "--ratio", "0.3", "--imgsz", "65"], "not a multiple of"),
    (["prune", "cifar-resnet20", "--weights", "{in}/evil.pth", "--ratio", "0.3"], "Cannot read weights"),
    (["prune", "{in}/garbage.pt", "--ratio", "0.3"], "not a PyTorch checkpoint"),
    # finetune
    ([*TUNE, "--out", "{in}/r20-random.safetensors"], "is --teacher-weights itself"),
    ([*TUNE, "--out", "{in}/synth/shard-00000.safetensors"], "lies inside --data"),
    ([*TUNE, "--out", "{out}/t.safetensors", "--lr", "1e30", "--epochs", "2"], "diverged"),
    ([*TUNE, "--out", "{out}/t.safetensors", "--lr", "nan"], "--lr must be"),
    ([*TUNE, "--out", "{out}/t.safetensors", "--weight-decay", "-1"], "--weight-decay must be"),
    ([*TUNE, "--out", "{out}/t.safetensors", "--batch", "1"], "--batch"),
    (["finetune", "{in}/pruned.safetensors", "--teacher", "{yolo}", "--teacher-weights", "{in}/r20.pth", "--data", "{in}/synth"],
     "--teacher-weights applies"),
    (["finetune", "{in}/pruned.safetensors", *TEACHER, "--data", "{in}/synth-r56", "--out", "{out}/t.safetensors"], "--allow-teacher-mismatch"),
    (["finetune", "{in}/pruned.safetensors", *TEACHER, "--data", "{in}/folder"], "not a dfbf synthetic dataset"),
    # eval
    (["eval", "{yolo}", "--data", "{in}/nolabels/data.yaml"], "has a label file"),
    (["eval", "{yolo}", "--data", "{in}/badlabel/data.yaml"], "line 1"),
    (["eval", "{yolo}", "--data", "{in}/badimage/data.yaml"], "Cannot read image"),
    (["eval", "{yolo}", "--data", "{in}/emptyval/data.yaml"], "holds no images"),
    (["eval", "{yolo}", "--data", "{in}/kpt/data.yaml"], "kpt_shape"),
    (["eval", *R20, "--data", "{in}/empty.npz"], "at least one image"),
    (["eval", *R20, "--data", "{in}/labels2d.npz"], "'y' must hold"),
    (["eval", *R20, "--data", "{in}/labelstr.npz"], "'y' must hold"),
    (["eval", *R20, "--data", "{in}/photos", *TEACHER, "--robustness"], "needs labelled --data"),
    (["eval", *R20, "--data", "{in}/ok.npz", "--teacher-weights", "{in}/r20.pth"], "applies to a --teacher"),
    (["eval", *R20, "--data", "{in}/bad.yaml"], "not valid YAML"),
    (["eval", *R20, "--data", "{in}/photos-broken", *TEACHER], "Cannot read image"),
    (["eval", *R20, "--data", "{in}/ok.npz", "--imgsz", "32", "--batch", "0"], "--batch"),
    # compress
    (["compress", *R20, "--ratio", "0.3", "--max-drop", "1"], "--max-drop needs --data"),
    (["compress", *R20, "--ratio", "0.3", "--data", "{in}/labels2d.npz"], "'y' must hold"),
    (["compress", *R20, "--ratio", "0.3", "--out", "{in}/folder"], "is not a dfbf compress run"),
    (["compress", *R20, "--ratio", "0.3", "--out", "{in}/truncated-run"], "damaged"),
    (["compress", *R20, "--ratio", "0.3", "--out", "{in}/notes.txt"], "existing file"),
    (["compress", *R20, "--ratio", "0.3", "--out", "{in}"], "lies inside --out"),
    (["compress", "{yolo}", "--ratio", "0.3", "--imgsz", "70"], "not a multiple of"),
    (["compress", *R20, "--ratio", "0.3", "--rounds", "2", "--strategy", "progressive"], "--rounds applies"),
    (["compress", *R20, "--ratio", "0.3", "--allow-teacher-mismatch"], "applies to a --synthetic"),
    (["compress", *R20, "--ratio", "0.3", "--synthetic", "{in}/synth-r56"], "--allow-teacher-mismatch"),
    (["compress", *R20, "--ratio", "0.3", "--synthetic", "{in}/synth", "--num-images", "5"], "applies to images compress makes"),
    (["compress", *R20, "--ratio", "0.3", "--synthetic", "{in}/synth", "--imgsz", "24"], "differs from"),
    (["compress", *R20, "--ratio", "0.3", "--max-drop", "-1", "--data", "{in}/ok.npz"], "--max-drop must be"),
    (["compress", *R20, "--flops", "0.6", "--allocation", "sensitivity", "--schedule", "layer-dependent"], "--schedule applies to --ratio"),
    (["compress", *R20], "Give --ratio"),
    # second round: new options, numbers at their edges, links and look-alikes
    (["prune", *R20, "--ratio", "0.3", "--reconstruct"], "pass --synthetic"),
    (["prune", *R20, "--ratio", "0.3", "--reconstruct", "--strategy", "progressive", "--synthetic", "{in}/synth"], "follows one-shot"),
    (["compress", *R20, "--ratio", "0.3", "--rounds", "2", "--reconstruct"], "leave it out"),
    (["compress", *R20, "--ratio", "0.3", "--strategy", "progressive", "--reconstruct"], "leave it out"),
    (["export", "{yolo}", "--format", "openvino", "--out", "{out}/mine"], "_openvino_model"),
    (["export", *R20, "--format", "onnx", "--out", "{out}/model.bin"], "ends in .onnx"),
    (["export", *R20, "--format", "onnx", "--out", "{in}/link.onnx"], "is --weights itself"),
    (["prune", *R20, "--ratio", "0.3", "--out", "{in}/link.safetensors"], "is --weights itself"),
    (["prune", *R20, "--ratio", "1.5"], "--ratio must be between"),
    (["prune", *R20, "--ratio", "0"], "--ratio must be between"),
    (["prune", *R20, "--ratio", "nan"], "--ratio must be between"),
    (["prune", *R20, "--ratio", "0.3", "--min-channels", "0"], "Invalid value"),
    (["compress", *R20, "--flops", "1.0"], "--flops must be between"),
    (["compress", *R20, "--ratio", "0.3", "--flops", "0.7"], "one of them"),
    (["compress", *R20, "--ratio", "0.3", "--int8"], "--int8 applies to --export"),
    (["compress", *R20, "--ratio", "0.3", "--synthetic", "{in}/synth-escape"], "not a shard of this folder"),
    (["compress", *R20, "--ratio", "0.3", "--synthetic", "{in}/synth-link"], "--allow-teacher-mismatch"),
    (["synthesize", *R20, "--out", "{out}/s", "--num-images", "1"], "Invalid value"),
    (["synthesize", *R20, "--out", "{out}/s", "--imgsz", "4"], "Invalid value"),
    (["synthesize", *R20, "--out", "{out}/s", "--iterations", "0"], "Invalid value"),
    ([*TUNE, "--out", "{out}/t.safetensors", "--epochs", "0"], "Invalid value"),
    (["finetune", "{in}/pruned.safetensors", *TEACHER, "--data", "{in}/synth-count", "--out", "{out}/t.safetensors"], "disagrees"),
    (["eval", *R20, "--data", "{in}/notes.txt"], "neither a dataset YAML nor an .npz"),
    (["eval", *R20, "--data", "{in}/no-such-folder"], "does not exist"),
    (["eval", *R20, "--data", "{in}/empty-photos", *TEACHER], "no image"),
    (["eval", *R20, "--data", "{in}/photos-odd", *TEACHER], "Cannot read image"),
    (["synthesize", *R20, "--out", "{in}/synth-link"], "another model"),
]


@pytest.mark.parametrize(("args", "message"), CATALOGUE, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(CATALOGUE)])
def test_a_mistake_is_one_sentence_exit_2_before_any_work_and_changes_no_input(run_cli, pristine, tmp_path, monkeypatch, args, message):
    source, _r20, yolo, _data = pristine
    inputs = shutil.copytree(source, tmp_path / "in", symlinks=True)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    before = _checksums(inputs)
    result = run_cli(*[a.format(**{"in": inputs, "out": out, "yolo": inputs / yolo.name}) for a in args], "--device", "cpu")
    assert result.code == 2, (result.code, result.stderr[-3000:])
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) <= 1 and (errors or "Invalid value" in result.stderr or "Usage:" in result.stderr), result.stderr
    assert _checksums(inputs) == before  # nothing read was changed, nothing was written among the inputs
    assert not any(out.iterdir()), list(out.iterdir())  # and nothing half-written where the outputs would go


def test_the_catalogue_covers_every_command_ninety_times_over():
    assert len(CATALOGUE) >= 90 and {args[0] for args, _ in CATALOGUE} == {"synthesize", "prune", "finetune", "eval", "compress", "export"}


READERS = [  # every way a command reads a model or state file, given the exploit file
    ["synthesize", "{evil_pt}", "--out", "{out}/s"],
    ["prune", "{evil_pt}", "--ratio", "0.3"],
    ["prune", "cifar-resnet20", "--weights", "{evil_pth}", "--ratio", "0.3"],
    ["eval", "{evil_pt}", "--data", "{data}"],
    ["eval", "{yolo}", "--teacher", "{evil_pt}", "--data", "{photos}"],
    ["eval", "cifar-resnet20", "--weights", "{evil_pth}", "--data", "{npz}"],
    ["finetune", "{evil_pt}", "--teacher", "{yolo}", "--data", "{synth}"],
    ["finetune", "{in}/pruned.safetensors", "--teacher", "{evil_pt}", "--data", "{synth}"],
    ["finetune", "{in}/pruned.safetensors", "--teacher", "cifar-resnet20", "--teacher-weights", "{evil_pth}", "--data", "{synth}"],
    ["finetune", "{in}/pruned.safetensors", *TEACHER, "--data", "{synth}", "--out", "{out}/t.safetensors", "--resume"],  # evil state file
    ["compress", "{evil_pt}", "--ratio", "0.3"],
    ["compress", "cifar-resnet20", "--weights", "{evil_pth}", "--ratio", "0.3"],
]


@pytest.mark.parametrize("args", READERS, ids=[f"{a[0]}-{i}" for i, a in enumerate(READERS)])
def test_no_code_runs_from_a_file_dfbf_reads(run_cli, pristine, tmp_path, monkeypatch, args):
    source, _r20, yolo, data = pristine
    inputs = shutil.copytree(source, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    for name in ("evil.pt", "evil.pth"):  # the exploit writes its marker here, in this test's own folder
        torch.save({"model" if name.endswith(".pt") else "state_dict": Exploit(tmp_path / MARKER), "train_args": {}}, inputs / name)
    torch.save({"model": Exploit(tmp_path / MARKER), "epoch": 1}, out / "t.finetune-state.pt")
    paths = {"in": inputs, "out": out, "yolo": inputs / yolo.name, "evil_pt": inputs / "evil.pt", "evil_pth": inputs / "evil.pth",
             "data": inputs / "pose" / "data.yaml", "photos": inputs / "photos", "npz": inputs / "ok.npz", "synth": inputs / "synth"}
    result = run_cli(*[a.format(**paths) for a in args], "--device", "cpu")
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / MARKER).exists(), "unpickling ran code"


def test_trusting_a_checkpoint_is_an_explicit_opt_in(run_cli, pristine, tmp_path, monkeypatch):
    source, *_ = pristine
    evil = tmp_path / "evil.pt"
    torch.save({"model": Exploit(tmp_path / MARKER), "train_args": {}}, evil)
    refused = run_cli("prune", evil, "--ratio", "0.3")
    assert refused.code == 2 and "DFBF_TRUST_CHECKPOINTS=1" in refused.stderr and not (tmp_path / MARKER).exists()
    monkeypatch.setenv("DFBF_TRUST_CHECKPOINTS", "1")
    trusted = run_cli("prune", evil, "--ratio", "0.3")
    assert (tmp_path / MARKER).exists()  # the user asked for it: the file was unpickled without restriction
    assert trusted.code == 2 and "no model in it" in trusted.stderr


def test_resuming_a_fine_tune_on_other_images_is_refused(run_cli, pristine, tmp_path, monkeypatch):
    import dfbf_cli.engine.finetune as finetune_module

    source, *_ = pristine
    inputs = shutil.copytree(source, tmp_path / "in")
    other = _synthesize(["cifar-resnet20", "--weights", str(inputs / "r20-random.safetensors")], tmp_path / "other", seed=5)
    args = ["finetune", inputs / "pruned.safetensors", "--teacher", "cifar-resnet20", "--teacher-weights", inputs / "r20-random.safetensors",
            "--out", tmp_path / "t.safetensors", "--epochs", "3", "--batch", "2", "-q"]
    calls = {"n": 0}
    real = finetune_module.cutmix

    def die_in_epoch_two(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(finetune_module, "cutmix", die_in_epoch_two)
    assert run_cli(*args, "--data", inputs / "synth").code == 130
    monkeypatch.setattr(finetune_module, "cutmix", real)
    refused = run_cli(*args, "--data", other, "--resume")
    assert refused.code == 2 and "data" in refused.stderr and "differ" in refused.stderr
    assert run_cli(*args, "--data", inputs / "synth", "--resume").code == 0


def test_json_is_strict_and_ultralytics_output_stays_off_stdout(run_cli, pristine, tmp_path):
    _source, _r20, yolo, data = pristine
    result = run_cli("eval", yolo, "--data", data, "--latency-runs", "1", "--device", "cpu")
    assert result.code == 0 and "\x1b[" not in result.stdout and "Class" not in result.stdout  # no Ultralytics progress lines
    parsed = json.loads(run_cli("eval", yolo, "--data", data, "--latency-runs", "1", "--json").stdout, parse_constant=pytest.fail)
    assert parsed["models"][0]["metrics"]["pose_map50_95"] == 0.0
