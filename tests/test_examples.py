"""Every example runs, in a fast mode, and answers --help."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
# Raw reST that a terminal would show as it is: literals, roles, section underlines.
RAW_REST = re.compile(r"``|:[a-z]+:`|^\s*(=|-){3,}\s*$", re.MULTILINE)


def run(script, *args, cwd=None, python_options=()):
    """Run an example as a script (its folder on sys.path, as `python examples/x.py` has it)."""
    return subprocess.run(
        [sys.executable, *python_options, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_answers_help_at_once_in_plain_text(script):
    # -X importtime lists every module imported, one per line: "import time: ... | name".
    result = run(script, "--help", python_options=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    assert not RAW_REST.search(result.stdout), result.stdout
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "argparse" in imported  # the listing works
    # torch alone takes seconds; the others are needed only once the arguments are known.
    assert not imported & {"torch", "sklearn", "pandas", "matplotlib", "ltlearn"}


def test_the_raw_rest_check_finds_what_it_looks_for():
    for text in ("see ``--out``", "see :mod:`ltlearn`", "Title\n=====\n", "Part\n----"):
        assert RAW_REST.search(text), text
    assert not RAW_REST.search("--out OUT  figure (default: out.png)\n  -h, --help")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_stands_alone(script):
    """A script downloaded from the gallery imports nothing from the examples folder."""
    local = {p.stem for p in EXAMPLES.glob("*.py")}
    source = (EXAMPLES / script).read_text()
    for line in source.splitlines():
        words = line.split()
        if words[:1] in (["import"], ["from"]):
            assert words[1].split(".")[0] not in local, line


def test_quickstart_runs(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["quickstart.py"])
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    accuracy = float(out.split("balanced test accuracy: ")[1].split()[0])
    assert accuracy > 0.85
    cv_line = out.split("3-fold CV on the training set: ")[1].splitlines()[0]
    cv_balanced, cv_few = (float(part.split()[-1]) for part in cv_line.split(", "))
    # Estimated from the training set alone, within a few points of the test set's.
    assert abs(cv_balanced - accuracy) < 0.05
    assert 0.5 < cv_few <= 1
    uniform = float(out.split("uniform prior assumed: ")[1].split()[0])
    adapted = float(out.split("prior inferred by adapt: ")[1].split()[0])
    assert adapted > uniform


def test_a_mistyped_feature_file_is_an_error_not_a_fallback(tmp_path):
    result = run("cifar10_lt.py", "--features", str(tmp_path / "typo.h5"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_cifar10_lt_example_prints_the_tables(tmp_path):
    pytest.importorskip("pandas")
    result = run("cifar10_lt.py", "--digits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tail" in result.stdout  # the per-group table
    for row in ("as trained", "adapted (prior inferred)", "true test prior given"):
        assert row in result.stdout
    assert "F50" in result.stdout and "B50" in result.stdout


def test_prl_example_writes_the_simplex_figure(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    out = tmp_path / "simplex.png"
    result = run("prl_preferences.py", "--digits", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "suggested per test set" in result.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_calibration_example_writes_reliability_diagrams(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "reliability.png"
    result = run("calibration_reliability.py", "--digits", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_grid_search_example(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    out = tmp_path / "grid.png"
    result = run("grid_search.py", "--digits", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "best parameters" in result.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_cifar100_example_smoke_run_writes_tables_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    result = run("cifar100_lt.py", "--smoke", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("accuracy.csv", "test_agnostic.csv"):
        assert (tmp_path / name).read_text().count("\n") >= 3
    assert (tmp_path / "test_agnostic.png").read_bytes()[:4] == b"\x89PNG"
    assert "PRL + adapt (MAP)" in (tmp_path / "test_agnostic.csv").read_text()


def test_cifar100_example_names_both_ways_to_get_the_data(tmp_path):
    pytest.importorskip("pandas")
    result = run("cifar100_lt.py", "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "--data-dir" in result.stderr and "--download" in result.stderr
    assert not (tmp_path / "cifar100_lt").exists()  # no output directory without data


@pytest.mark.skipif(not (SHARED / "cifar10-train-jpg.zip").exists(), reason="../shared is absent")
def test_cifar10_from_images_example_smoke_run(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    result = run("cifar10_lt_images.py", "--smoke", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "BalancedSoftmax + adapt (MAP)" in (tmp_path / "test_agnostic.csv").read_text()


def table_row(stdout, label, convert=float):
    """The cells of the row of a printed table that starts with ``label``."""
    for line in stdout.splitlines():
        if line.startswith(label + "  "):
            return [convert(word) for word in line[len(label) :].split()]
    raise AssertionError(f"no row {label!r} in:\n{stdout}")


def test_long_tail_methods_example_ranks_every_method(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    result = run("long_tail_methods.py", "--seeds", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    methods = ["cross-entropy", "Balanced Softmax", "SADE", "RIDE", "SHIKE", "cRT"]
    rows = {m: table_row(result.stdout, m) for m in [*methods, "tau-normalisation", "LWS"]}
    # accuracy, many, medium, few, ECE (%), fit time (s)
    assert all(len(row) == 6 and 0 < row[0] <= 100 for row in rows.values())
    for method in methods[1:]:  # every re-balancing method lifts the few classes
        assert rows[method][3] > rows["cross-entropy"][3] + 5, method


def test_shifted_test_set_example_adapts_only_to_a_shift(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    result = run("shifted_test_set.py", "--digits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # rows, accuracy as trained, adapted, shift p-value, shift detected
    balanced = table_row(result.stdout, "balanced", convert=str)
    assert balanced[-1] == "False"  # no shift detected: predictions unchanged
    assert balanced[1] == balanced[2]
    forward = table_row(result.stdout, "forward 10", convert=str)
    assert forward[-1] == "True" and float(forward[2]) > float(forward[1])
    assert "true prior inside the 90 % interval" in result.stdout
    for method in ("map", "em"):
        assert 0 <= table_row(result.stdout, method)[0] < 0.5  # L1 error of the prior


def test_features_out_of_core_example_writes_and_streams_the_files(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    pytest.importorskip("PIL")
    from ltlearn.features import FeatureFile

    result = run("features_out_of_core.py", "--out-dir", str(tmp_path), "--rows", "3000")
    assert result.returncode == 0, result.stderr
    assert "streamed and in-memory fits predict the same: True" in result.stdout
    with FeatureFile(tmp_path / "digits_features.h5") as f:
        assert f.n_rows("train") < f.n_rows("test") == 899  # a long tail, a balanced half
        assert f.attrs["backbone"] == "random convolutions"
    with FeatureFile(tmp_path / "synthetic_features.h5") as f:
        assert f.n_rows("train") == 3000
    # Without --out-dir the files go to a temporary directory, removed at the end.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "features_out_of_core.py"), "--rows", "2000"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert list(scratch.iterdir()) == []
