import subprocess
import sys

import numpy as np
import pytest

from ltlearn.cli import main
from ltlearn.features import write_features


@pytest.mark.parametrize(
    "argv", [["--help"], ["demo", "--help"], ["info", "--help"], ["merge", "--help"]]
)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: ltlearn" in capsys.readouterr().out


def test_demo_on_digits_prints_the_table(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in ("BalancedSoftmaxClassifier()", "tau=0", "LogisticRegression"):
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("BalancedSoftmaxClassifier() "))
    overall = float(row.split()[1])
    assert overall > 85


def test_demo_on_a_feature_file_and_info(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 3
    y_train = np.repeat(np.arange(3), 200)
    y_test = np.repeat(np.arange(3), 50)
    path = tmp_path / "toy.h5"
    write_features(
        path,
        {
            "train": (centers[y_train] + rng.normal(size=(600, 16)), y_train),
            "test": (centers[y_test] + rng.normal(size=(150, 16)), y_test),
        },
        classes=["a", "b", "c"],
        attrs={"backbone": "toy"},
    )
    assert main(["demo", "--features", str(path), "--imbalance-ratio", "10"]) == 0
    out = capsys.readouterr().out
    assert "IR 10" in out and "[200, 63, 20]" in out
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train: 600 rows x 16 features (float16)" in out and "backbone: toy" in out


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["demo", "--features", str(tmp_path / "missing.h5")]) == 1
    assert "missing.h5" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "ltlearn.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("ltlearn ")
