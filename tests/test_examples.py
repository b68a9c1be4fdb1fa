import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    accuracy = float(out.split("balanced test accuracy: ")[1].split()[0])
    assert accuracy > 0.85
    assert "best parameters" in out
    uniform = float(out.split("uniform prior assumed: ")[1].split()[0])
    adapted = float(out.split("prior inferred by adapt: ")[1].split()[0])
    assert adapted > uniform


@pytest.mark.slow
def test_cifar10_lt_example_runs(cifar_features, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cifar10_lt.py", "--features", str(cifar_features)])
    runpy.run_path(str(EXAMPLES / "cifar10_lt.py"), run_name="__main__")
    assert "with true test prior" in capsys.readouterr().out


def test_prl_example_writes_the_simplex_figure(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "simplex.png"
    argv = ["prl_preferences.py", "--features", str(tmp_path / "absent.h5"), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(EXAMPLES / "prl_preferences.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "digits" in printed and "suggested per test set" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_calibration_example_writes_reliability_diagrams(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "reliability.png"
    argv = [
        "calibration_reliability.py",
        "--features",
        str(tmp_path / "absent.h5"),
        "--out",
        str(out),
    ]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(EXAMPLES / "calibration_reliability.py"), run_name="__main__")
    assert "digits" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"
