"""The Python API: README's example runs as written (on a tiny random model), and a mistake raises the
sentence the CLI prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import dfbf_cli as dfbf
from dfbf_cli.settings import PRESETS, Preset, PresetName, SynthesisSettings

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs(random_pose, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="needs the export extra: pip install 'dfbf[export]'")
    model, data = random_pose
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(PRESETS, PresetName.QUICK, Preset(8, 8, 64, SynthesisSettings(low_res_iterations=0, iterations=2), 4, 4))  # seconds
    code = _readme_example().replace('"yolo11n-pose.pt"', repr(str(model))).replace('"coco8-pose/data.yaml"', repr(str(data)))
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "pose_map50_95" in printed and "fp32" in printed
    assert (tmp_path / "run" / "report.json").is_file() and (tmp_path / "run" / "compressed.onnx").is_file()


def test_a_mistake_raises_the_sentence_the_cli_prints(run_cli, random_r20):
    with pytest.raises(dfbf.DfbfError) as raised:
        dfbf.compress(random_r20[0], weights=random_r20[2], ratio=1.5)
    cli = run_cli("compress", *random_r20, "--ratio", "1.5", "--device", "cpu", "-q")
    assert cli.code == 2 and str(raised.value) in cli.stderr.replace("\n", " ")


@pytest.mark.parametrize(("call", "option"), [
    (lambda model: dfbf.prune(model, ratio=0.3, strategy="progresive"), "--strategy"),
    (lambda model: dfbf.export(model, "openvino", int8=True, recipe="outputs_fp"), "--int8-recipe"),
    (lambda model: dfbf.compress(model, ratio=0.3, preset="quik"), "--preset"),
    (lambda model: dfbf.evaluate([model], "data.npz", batch=0), "--batch"),
])
def test_a_string_or_number_the_cli_would_refuse_is_refused_from_python_too(call, option):
    with pytest.raises(dfbf.DfbfError, match=option):
        call("cifar-resnet20")
