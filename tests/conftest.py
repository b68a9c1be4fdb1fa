from pathlib import Path

import pytest

SHARED_FEATURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_effnetlite0.h5"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _examples_write_into_a_temporary_directory(request, monkeypatch):
    """Run the tests of the examples in a temporary working directory.

    An example writes its outputs under the working directory unless told where: a
    test run must leave the checkout as it found it.
    """
    if request.path.name == "test_examples.py":
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))


@pytest.fixture(scope="session")
def cifar_features():
    """Path of the real CIFAR-10 EfficientNet-Lite0 feature file, or skip."""
    if not SHARED_FEATURES.exists():
        pytest.skip(f"real feature file {SHARED_FEATURES} is absent")
    return SHARED_FEATURES


@pytest.fixture(scope="session")
def digits():
    from ltlearn.datasets import load_long_tailed_digits

    return load_long_tailed_digits(random_state=0)
