"""The renewed synthetic stream: fresh images each epoch, reproducible from the seed, resumable."""

from __future__ import annotations

import pytest
import torch

from dfbf_cli.adapters import load_model
from dfbf_cli.engine import finetune as finetune_module
from dfbf_cli.engine.pruning import prune
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.settings import FinetuneSettings, Precision, PruneSettings, Scope

CPU = torch.device("cpu")
SETTINGS = FinetuneSettings(epochs=3, batch=8, precision=Precision.FP32, renew=4, renew_steps=2, adversarial=1.0)


def _run(random_r20, synthetic, state, seed=0, **kwargs):
    teacher = load_model(random_r20[0], random_r20[2])
    student = prune(teacher, PruneSettings(0.5))[0]
    images, _ = SyntheticDataset.open(synthetic).load()
    finetune_module.finetune(student, teacher, images, settings=SETTINGS, scope=Scope.BACKBONE, device=CPU, seed=seed, state_path=state, **kwargs)
    return student, images


def test_the_stream_renews_images_and_is_reproducible_from_its_seed(random_r20, random_r20_synthetic, tmp_path, monkeypatch):
    seen = []
    real = finetune_module.RenewedPool.renew

    def spy(pool, *args):
        before = pool.images.clone()
        real(pool, *args)
        seen.append(int((pool.images != before).flatten(1).any(1).sum()))

    monkeypatch.setattr(finetune_module.RenewedPool, "renew", spy)
    first, images = _run(random_r20, random_r20_synthetic, tmp_path / "a.pt")
    assert seen == [4, 4]  # epochs 2 and 3 each renew 4 of the 16 images
    second, _ = _run(random_r20, random_r20_synthetic, tmp_path / "b.pt")
    other, _ = _run(random_r20, random_r20_synthetic, tmp_path / "c.pt", seed=1)
    weights = [m.model.layer1[0].conv1.weight for m in (first, second, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_an_interrupted_stream_resumes_to_the_same_model(random_r20, random_r20_synthetic, tmp_path, monkeypatch):
    reference, _ = _run(random_r20, random_r20_synthetic, tmp_path / "ref.pt")
    real, calls = finetune_module.augment, {"n": 0}

    def die_in_epoch_three(*args):
        calls["n"] += 1
        if calls["n"] == 8:  # 2 steps an epoch, and one call per renewal: epoch 3's first step
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(finetune_module, "augment", die_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        _run(random_r20, random_r20_synthetic, tmp_path / "state.pt")
    monkeypatch.setattr(finetune_module, "augment", real)
    assert (tmp_path / "state.pt").exists()
    resumed, _ = _run(random_r20, random_r20_synthetic, tmp_path / "state.pt", resume=True)
    for a, b in zip(resumed.model.state_dict().values(), reference.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_inversion_leaves_every_layer_in_the_mode_it_found_it():
    """A split's wrapper is a fresh module (training mode) around eval-mode layers: freezing and restoring it
    must not switch the layers to training (the teacher's statistics would drift during fine-tuning)."""
    from dfbf_cli.engine.synthesis import frozen

    teacher = load_model("cifar-resnet20")
    teacher.model.eval()
    wrapper = teacher.split().backbone
    with frozen(wrapper):
        assert not any(m.training for m in wrapper.modules())
    assert not any(m.training for m in teacher.model.modules())
