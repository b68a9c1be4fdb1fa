import argparse
import re
import subprocess
import sys

import numpy as np
import pytest

from ltlearn.cli import build_parser, main
from ltlearn.features import write_features

COMMANDS = ["demo", "info", "extract", "merge"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_text(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ltlearn" in out
    # Help is read in a terminal: no reST markup from docstrings.
    assert not re.search(r"``|:(mod|func|class|meth|attr):|====", out), out


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", COMMANDS)
def test_every_argument_has_help(command):
    parser = _subparsers(build_parser())[command]
    undocumented = [
        action.metavar or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not undocumented, f"ltlearn {command}: no help for {undocumented}"


def test_extract_help_explains_batch_size_dtype_and_output(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--batch-size N images per forward pass" in out and "(default: 64)" in out
    assert "storage type of the features" in out and "(default: float16)" in out
    assert "OUT.h5 feature file to write the split into" in out


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


def _long_tailed_file(path):
    """Train: 200, 63, 20 and 0 rows; test: 50 a class."""
    y_train = np.repeat(np.arange(4), [200, 63, 20, 0])
    y_test = np.repeat(np.arange(4), 50)
    write_features(
        path,
        {"train": (np.zeros((283, 2)), y_train), "test": (np.zeros((200, 2)), y_test)},
        classes=["cat", "dog", "a class name far longer than forty characters", "emu"],
    )
    return path


def test_info_prints_rows_per_class_and_the_imbalance_ratio(tmp_path, capsys):
    path = _long_tailed_file(tmp_path / "lt.h5")
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    train = lines.index("  train: 283 rows x 2 features (float16)")
    assert lines[train + 1] == (
        "    imbalance ratio 10.0: from 200 rows ('cat') to 20 "
        "('a class name far longer than forty ch...'); 1 of 4 classes has no rows "
        "(left out of the ratio)"
    )
    test = lines.index("  test: 200 rows x 2 features (float16)")
    assert lines[test + 1] == "    imbalance ratio 1.0: 50 rows per class"
    table = lines[lines.index("Rows per class:") + 1 :]
    assert [row.split()[-2:] for row in table] == [
        ["test", "train"],
        ["50", "200"],
        ["50", "63"],
        ["50", "20"],
        ["50", "0"],
    ]
    assert table[1].split()[0] == "cat" and table[4].split()[0] == "emu"


def test_info_lists_the_first_classes_only_when_asked(tmp_path, capsys):
    path = _long_tailed_file(tmp_path / "lt.h5")
    assert main(["info", str(path), "--max-classes", "2"]) == 0
    table = capsys.readouterr().out.split("Rows per class:\n")[1].splitlines()
    assert [row.split()[0] for row in table[1:3]] == ["cat", "dog"]
    assert table[3] == "  ... 2 more classes (--max-classes 0 lists every class)"
    assert len(table) == 4
    with pytest.raises(SystemExit) as exc:
        main(["info", str(path), "--max-classes", "-1"])
    assert exc.value.code == 2
    assert "expected 0 or more; got -1" in capsys.readouterr().err
