"""Resources that run out and two processes at once: one sentence, a stable exit code, nothing half-written,
and the same command continues once the resource is back."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time

import pytest

from tests.fixtures import photos

SYNTH = ["--num-images", "4", "--batch", "2", "--iterations", "2", "--low-res-iterations", "0", "--precision", "fp32", "--device", "cpu", "-q"]


def test_a_full_disk_is_exit_4_in_one_sentence_and_the_run_continues_later(run_cli, random_r20, tmp_path, monkeypatch):
    import dfbf_cli.engine.synthetic_dataset as dataset_module

    out, real, calls = tmp_path / "s", dataset_module.save_file, {"n": 0}

    def second_shard_fills_the_disk(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path)

    monkeypatch.setattr(dataset_module, "save_file", second_shard_fills_the_disk)
    full = run_cli("synthesize", *random_r20, "--out", out, *SYNTH)
    assert full.code == 4 and "The disk is full" in full.stderr and "Traceback" not in full.stderr, full.stderr
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["shard-00000.safetensors"]  # no partial shard
    monkeypatch.setattr(dataset_module, "save_file", real)
    again = run_cli("synthesize", *random_r20, "--out", out, *SYNTH, "--json")
    assert again.code == 0 and json.loads(again.stdout)["num_images"] == 4


def test_a_library_that_wraps_the_full_disk_or_runs_out_of_memory_is_named_too():
    from dfbf_cli.errors import EXIT_RESOURCE, exhausted

    class SafetensorError(Exception):
        pass

    wrapped = exhausted(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"))
    memory = exhausted(RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert wrapped.exit_code == memory.exit_code == EXIT_RESOURCE
    assert "disk is full" in str(wrapped) and "Out of memory" in str(memory) and "--batch" in str(memory)
    assert exhausted(OSError(errno.ENOMEM, "Cannot allocate memory")).exit_code == EXIT_RESOURCE
    assert exhausted(ValueError("a bug")) is None and exhausted(OSError(errno.ENOENT, "missing")) is None


def test_an_enormous_image_is_refused_in_one_sentence(run_cli, random_r20, tmp_path, monkeypatch):
    from PIL import Image

    folder = photos(tmp_path / "photos", count=2, size=48)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 × 48 is then over twice the limit: Pillow's bomb guard
    teacher = ["--teacher", random_r20[0], "--teacher-weights", random_r20[2]]
    result = run_cli("eval", *random_r20, "--data", folder, *teacher, "--device", "cpu", "-q")
    assert result.code == 2 and "decompression bombs" in result.stderr and "Traceback" not in result.stderr, result.stderr


HOLD = """
import sys, time
from pathlib import Path
from dfbf_cli.files import exclusive
with exclusive(Path(sys.argv[1]), "--out"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds (until the test ends)."""
    processes = []

    def hold(folder):
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_process_on_a_run_directory_or_dataset_stops_at_once_naming_the_first(run_cli, random_r20, random_r20_synthetic, tmp_path, held):
    run = tmp_path / "run"
    holder = held(run)
    started = time.perf_counter()
    result = run_cli("compress", *random_r20, "--ratio", "0.5", "--synthetic", random_r20_synthetic, "--out", run, "--epochs", "1", "--device", "cpu")
    assert result.code == 2 and f"PID {holder.pid}" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert time.perf_counter() - started < 30 and [p.name for p in run.iterdir()] == [".dfbf.lock"]
    dataset = tmp_path / "s"
    assert run_cli("synthesize", *random_r20, "--out", dataset, *SYNTH[2:], "--num-images", "2").code == 0  # 2 more are wanted below
    other = held(dataset)
    more = run_cli("synthesize", *random_r20, "--out", dataset, *SYNTH)
    assert more.code == 2 and f"PID {other.pid}" in more.stderr
    info = run_cli("synthesize", "--info", dataset, "--json")  # readers take no lock
    assert info.code == 0


def test_a_killed_run_leaves_no_stale_lock(run_cli, random_r20, random_r20_synthetic, tmp_path, held):
    run = tmp_path / "run"
    holder = held(run)
    holder.kill()
    holder.wait()
    result = run_cli("compress", *random_r20, "--ratio", "0.5", "--synthetic", random_r20_synthetic, "--out", run, "--epochs", "1",
                     "--device", "cpu", "-q")
    assert result.code == 0, result.stderr
