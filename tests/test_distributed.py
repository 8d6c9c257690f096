"""torchrun: two CPU processes (gloo) make the same dataset as one, resume each other's work, and
fine-tune with DistributedDataParallel into one checkpoint that loads like a single process's."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dfbf_cli.adapters import load_model
from dfbf_cli.engine.synthetic_dataset import SyntheticDataset
from dfbf_cli.files import LOCK_FILE
from tests.conftest import pruned_copy

pytestmark = pytest.mark.slow
SYNTHESIS = ["--num-images", "12", "--batch", "2", "--iterations", "3", "--low-res-iterations", "0", "--precision", "fp32", "-q"]
SLOW_SYNTHESIS = [*SYNTHESIS[:-3], "--iterations", "40", *SYNTHESIS[-3:]]  # slow enough to be killed halfway


def _torchrun(*args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """``dfbf ARGS`` in two fresh processes under torchrun (standalone rendezvous, gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dfbf_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(command, env=env, start_new_session=True, **popen)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _until_released(folder, timeout_s: float = 30.0) -> None:
    """Return once no process holds ``folder``'s dfbf lock."""
    deadline = time.time() + timeout_s
    with open(folder / LOCK_FILE) as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, "the killed run's lock was never released"
                time.sleep(0.1)


def _shards(folder) -> list[str]:
    return [s["sha256"] for s in json.loads((folder / "dataset.json").read_text())["shards"]]


def test_two_processes_make_the_dataset_of_one_and_resume_each_other(tmp_path, random_r20, run_cli):
    """Two processes are killed halfway; one process finishes their dataset, which is then the one a single process
    makes alone, image for image (by each shard's own seed), with no sidecar left."""
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    run = _torchrun("synthesize", *random_r20, "--out", killed, *SLOW_SYNTHESIS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(killed.glob("shard-*.safetensors"))) < 3 and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    _until_released(killed)  # the killed workers' locks go as the kernel tears them down, a moment after the launcher
    assert run_cli("synthesize", *random_r20, "--out", killed, *SLOW_SYNTHESIS).code == 0  # one process takes over
    assert run_cli("synthesize", *random_r20, "--out", reference, *SLOW_SYNTHESIS).code == 0
    assert _shards(killed) == _shards(reference)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())  # no sidecar left, one manifest


def test_distributed_fine_tuning_lowers_the_loss_into_one_checkpoint(tmp_path, random_r20, random_r20_synthetic, run_cli):
    synthetic = random_r20_synthetic
    teacher = load_model(random_r20[0], random_r20[2])
    pruned = pruned_copy(teacher, 0.5).save(tmp_path / "pruned.safetensors")
    common = ["finetune", pruned, "--teacher", random_r20[0], "--teacher-weights", random_r20[2], "--data", synthetic,
              "--epochs", "4", "--batch", "4", "--precision", "fp32", "--json"]
    out = tmp_path / "out"
    out.mkdir()
    done = _torchrun(*common, "--out", out / "ddp.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one JSON document: rank 1 prints nothing
    losses = [epoch["loss"] for epoch in report["history"]]
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in out.iterdir()) == ["ddp.safetensors"]  # one model, and the checkpoint removed
    student = load_model(str(out / "ddp.safetensors"))
    assert torch.equal(student.model.linear.weight, teacher.model.linear.weight)  # the head is the original's
    assert run_cli(*common, "--out", out / "single.safetensors").code == 0
    for a, b in zip(student.model.state_dict().values(), load_model(str(out / "single.safetensors")).model.state_dict().values()):
        assert a.shape == b.shape
    uneven = _torchrun(*common[:-1], "--batch", "3", "--out", out / "x.safetensors")
    assert uneven.returncode != 0 and "does not split evenly over 2 processes" in uneven.stderr
    assert "exitcode  : 2" in uneven.stderr  # each rank exits as one process would; torchrun itself reports 1


def test_synthetic_sidecars_are_adopted_in_order_and_a_damaged_one_is_made_again(tmp_path, random_r20, run_cli):
    out = tmp_path / "synth"
    assert run_cli("synthesize", *random_r20, "--out", out, *SYNTHESIS).code == 0
    reference = _shards(out)
    manifest = json.loads((out / "dataset.json").read_text())
    for entry in manifest["shards"][2:]:  # as if ranks had finished shards 2-5 and rank 0 had not recorded them
        (out / entry["file"].replace(".safetensors", ".json")).write_text(json.dumps(entry))
    (out / "shard-00004.json").write_text(json.dumps({**manifest["shards"][4], "sha256": "0" * 64}))  # a damaged record
    manifest["shards"], manifest["num_images"] = manifest["shards"][:2], 4
    (out / "dataset.json").write_text(json.dumps(manifest))
    assert SyntheticDataset.open(out).num_images == 4
    assert run_cli("synthesize", *random_r20, "--out", out, *SYNTHESIS).code == 0
    assert _shards(out) == reference and not list(out.glob("shard-*.json"))
