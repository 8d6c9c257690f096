"""Closed-form reconstruction: exact where an exact answer exists, never worse layer by layer, head untouched."""

from __future__ import annotations

import copy
import json

import torch

from dfbf_cli.adapters import load_model
from dfbf_cli.engine.features import feature_gap
from dfbf_cli.engine.pruning import apply_pruning, choose, cut_indices, kept_outputs, prune
from dfbf_cli.engine.reconstruct import fitted_layers, reconstruct
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import Criterion, PruneSettings, Scope

CPU = torch.device("cpu")


def _images(count: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random uint8 images (upsampled noise), N×3×size×size."""
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").mul(255).to(torch.uint8)


def test_a_pruned_duplicate_channel_is_restored_exactly():
    """Channel 5 of a block's hidden layer duplicates channel 3 (same filter, same BatchNorm): once 5 is cut,
    the next convolution can read 3 twice as hard, and reconstruction finds that weight."""
    torch.manual_seed(0)
    teacher = load_model("cifar-resnet20")
    model = teacher.model.eval()
    with torch.no_grad():
        model.layer1[0].conv1.weight[5] = model.layer1[0].conv1.weight[3]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(model.layer1[0].bn1, name)[5] = getattr(model.layer1[0].bn1, name)[3]
    groups = teacher.channel_groups(Scope.BACKBONE)
    group = next(g for g in groups if any(p.module == "layer1.0.conv1" for p in g.producers))
    chosen = {group.name: torch.tensor([c for c in range(group.size) if c != 5])}
    student = teacher.with_model(copy.deepcopy(model))
    apply_pruning(student.model, groups, chosen)
    kept = {name: index for (name, side), index in cut_indices(model, groups, chosen).items() if side == "out"}
    x = _images(8, 32, seed=1).float() / 255
    assert feature_gap(student, teacher, x, scope=Scope.BACKBONE, device=CPU) > 1e-3  # cutting it did change the output

    fits = reconstruct(student, teacher, _images(32, 32, seed=2), kept=kept, scope=Scope.BACKBONE, damping=1e-9, device=CPU)
    assert any(f.name == "layer1.0.conv2" and f.refit for f in fits)
    with torch.no_grad():
        torch.testing.assert_close(student.model(teacher.input_spec.normalize(x)), model(teacher.input_spec.normalize(x)), rtol=1e-3, atol=1e-3)


def test_reconstruction_lowers_each_layers_error_and_the_feature_gap():
    torch.manual_seed(1)
    teacher = load_model("cifar-resnet20")
    settings = PruneSettings(0.5)
    chosen = choose(teacher, settings)
    student, _ = prune(teacher, settings, chosen)
    probe = _images(8, 32, seed=3).float() / 255
    before = feature_gap(student, teacher, probe, scope=settings.scope, device=CPU)
    fits = reconstruct(student, teacher, _images(32, 32, seed=4), kept=kept_outputs(teacher, settings.scope, chosen), scope=settings.scope,
                       damping=1e-3, device=CPU)
    assert len(fits) == len(fitted_layers(student, settings.scope, probe[:1])) and fits
    assert all(f.after <= f.before for f in fits)  # on its own images, no layer ends worse than it started
    assert any(f.refit and f.after < 0.5 * f.before for f in fits)
    assert feature_gap(student, teacher, probe, scope=settings.scope, device=CPU) < 0.7 * before  # and it carries to new images


def test_reconstruction_leaves_the_head_bit_identical_and_follows_batchnorm(random_pose):
    """YOLO: convolutions without bias get their fitted bias through the BatchNorm that reads them; the
    neck and head (backbone scope) are not touched."""
    teacher = load_model(str(random_pose[0]))
    settings = PruneSettings(0.3)
    chosen = choose(teacher, settings)
    student, _ = prune(teacher, settings, chosen)
    layers = fitted_layers(student, settings.scope, torch.zeros(1, 3, 64, 64))
    assert layers and all(bn is not None for _, bn in layers)  # every Ultralytics Conv is conv → bn → act
    head_prefixes = tuple(f"{name}." for name in student.split(settings.scope).head_modules)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    reconstruct(student, teacher, _images(8, 64, seed=5), kept=kept_outputs(teacher, settings.scope, chosen), scope=settings.scope,
                damping=1e-3, device=CPU)
    after = student.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith(head_prefixes))
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert any(k.endswith(".bn.running_mean") for k in changed) and any(k.endswith(".conv.weight") for k in changed)


def test_prune_reconstruct_writes_a_closer_model(run_cli, tmp_path, random_r20, random_r20_synthetic):
    plain, refit = tmp_path / "plain.safetensors", tmp_path / "refit.safetensors"
    args = ["prune", *random_r20, "--ratio", "0.5", "--device", "cpu", "-q"]
    assert run_cli(*args, "--out", plain).code == 0
    result = run_cli(*args, "--out", refit, "--synthetic", random_r20_synthetic, "--reconstruct", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["reconstructed"] is True and report["settings"]["criterion"] == "energy"  # the default where a refit follows
    teacher, probe = load_model(random_r20[0], random_r20[2]), _images(8, 32, seed=6).float() / 255
    gaps = [feature_gap(load_model(str(p)), teacher, probe, scope=Scope.BACKBONE, device=CPU) for p in (plain, refit)]
    assert gaps[1] < gaps[0]
    missing = run_cli(*args, "--out", tmp_path / "x.safetensors", "--reconstruct")
    assert missing.code == 2 and "--synthetic" in missing.stderr and not (tmp_path / "x.safetensors").exists()


def test_compress_resumes_after_reconstruction_without_redoing_it(run_cli, tmp_path, random_r20, random_r20_synthetic, monkeypatch):
    import dfbf_cli.engine.compress as compress_module
    import dfbf_cli.engine.finetune as finetune_module

    run_dir = tmp_path / "run"
    args = ["compress", *random_r20, "--ratio", "0.5", "--synthetic", random_r20_synthetic, "--out", run_dir, "--epochs", "2", "--reconstruct",
            "--device", "cpu", "-q"]

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "augment", interrupted)
    assert run_cli(*args).code == 130
    assert (run_dir / "reconstructed.safetensors").exists() and not (run_dir / "compressed.safetensors").exists()
    monkeypatch.undo()

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("reconstruction ran again")

    monkeypatch.setattr(compress_module, "refit_pruned", must_not_run)
    result = run_cli(*args, "--json")
    assert result.code == 0, result.stderr
    assert set(json.loads(result.stdout)["fidelity"]["feature_distance_on_fresh_synthetic_images"]) == {"pruned", "reconstructed", "compressed"}
    rounds = run_cli(*args, "--rounds", "2")
    assert rounds.code == 2 and "leave it out with --rounds" in rounds.stderr


def test_the_chosen_channels_are_saved_and_a_run_from_before_that_gets_them_on_resume(run_cli, tmp_path, random_r20, random_r20_synthetic):
    """pruning.json holds which channels each group keeps (the cut and the refit read them); a run directory whose plan
    holds only how many (made before) chooses them again when resumed: the same ones."""
    run_dir = tmp_path / "run"
    args = ["compress", *random_r20, "--ratio", "0.5", "--synthetic", random_r20_synthetic, "--out", run_dir, "--epochs", "1", "--reconstruct",
            "--device", "cpu", "-q"]
    assert run_cli(*args).code == 0
    plan = json.loads((run_dir / "pruning.json").read_text())
    assert set(plan) == {"keep", "chosen"} and all(len(plan["chosen"][name]) == count for name, count in plan["keep"].items())
    (run_dir / "pruning.json").write_text(json.dumps({"keep": plan["keep"]}))
    for name in ("pruned.safetensors", "reconstructed.safetensors", "compressed.safetensors", "finetune-history.json"):
        (run_dir / name).unlink()
    assert run_cli(*args).code == 0
    assert json.loads((run_dir / "pruning.json").read_text()) == plan


def test_energy_pruning_is_refit_to_the_channels_it_kept(run_cli, tmp_path, random_r20, random_r20_synthetic):
    """The reconstruction's targets are the channels pruning kept, which energy chose on images."""
    teacher, settings = load_model(random_r20[0], random_r20[2]), PruneSettings(0.5, criterion=Criterion.ENERGY)
    images = SyntheticDataset.open(random_r20_synthetic).probe(16)
    keep = {g.name: settings.keep_count(g.size) for g in teacher.channel_groups()}
    chosen = choose(teacher, settings, keep, images)
    pruned, _ = prune(teacher, settings, chosen)
    kept = kept_outputs(teacher, settings.scope, chosen)
    differs = False
    for name, index in kept.items():
        module = teacher.model.get_submodule(name)
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(pruned.model.get_submodule(name).weight, module.weight[index]), name
            differs |= not torch.equal(index, kept_outputs(teacher, settings.scope, choose(teacher, PruneSettings(0.5), keep))[name])
    assert differs  # energy chose other channels than L1 somewhere, so the check above has teeth

    args = ["prune", *random_r20, "--ratio", "0.5", "--criterion", "energy", "--device", "cpu", "-q"]
    missing = run_cli(*args, "--out", tmp_path / "x.safetensors")
    assert missing.code == 2 and "--synthetic" in missing.stderr
    plain, refit = tmp_path / "plain.safetensors", tmp_path / "refit.safetensors"
    assert run_cli(*args, "--synthetic", random_r20_synthetic, "--out", plain).code == 0
    assert run_cli(*args, "--synthetic", random_r20_synthetic, "--out", refit, "--reconstruct").code == 0
    probe = _images(8, 32, seed=7).float() / 255
    gaps = [feature_gap(load_model(str(p)), teacher, probe, scope=Scope.BACKBONE, device=CPU) for p in (plain, refit)]
    assert gaps[1] < gaps[0]
