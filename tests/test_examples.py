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


@pytest.mark.slow
def test_cifar10_lt_example_runs(cifar_features, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cifar10_lt.py", "--features", str(cifar_features)])
    runpy.run_path(str(EXAMPLES / "cifar10_lt.py"), run_name="__main__")
    assert "with true test prior" in capsys.readouterr().out
