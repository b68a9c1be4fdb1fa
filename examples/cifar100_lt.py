# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
CIFAR-100-LT, the whole pipeline
================================

The standard benchmark of long-tail papers, from the official ``cifar-100-python``
directory to the papers' tables: long-tailed training sets at IR 100, 50 and 10 (the
CIFAR-LT profile), features from the backbone ``--backbone`` names (cached in
``--out-dir`` and reused on the next run), BalancedSoftmaxClassifier and PRLClassifier,
accuracy on the balanced test set per group of classes, and accuracy on SADE's shifted
test sets, adapted to each one's unlabeled features or not. Tables print and go to CSV
files beside a PNG plot.

The data: ``--data-dir`` holding ``cifar-100-python/`` (as torchvision lays it out), or
``--download`` to fetch it through torchvision. ``--smoke`` runs the same code on a
small generated directory in the official format with a tiny random backbone, in
seconds. (This page shows the code without running it: the documentation is built
offline.)

.. code-block:: console

    python cifar100_lt.py --data-dir DIR --backbone efficientnet-lite0
    python cifar100_lt.py --smoke

Needs torchvision for ``--download``, the ``effnet`` extra for the default backbone,
pandas and matplotlib (``pip install "ltlearn[effnet,torchvision]" pandas matplotlib``).
"""

import argparse
import copy
import pickle
from pathlib import Path

# %%
# The command line
# ----------------


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


def write_small_cifar100(root, per_class_train=30, per_class_test=10, seed=0):
    """A ``cifar-100-python`` directory of random 32 x 32 images, in the official format."""
    directory = Path(root) / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Each class gets its own mean colour, so that the classes can be told apart.
    colours = rng.integers(0, 256, (100, 3))
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per_class)
        images = colours[labels][:, :, None, None] + rng.normal(0, 40, (len(labels), 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), -1)
        with open(directory / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, f)
    with open(directory / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class_{c:02d}".encode() for c in range(100)]}, f)
    return Path(root)


parser = argparse.ArgumentParser(description="CIFAR-100-LT, the whole pipeline.")
parser.add_argument(
    "--data-dir", type=Path, default=Path("data"), help="holds cifar-100-python/ (default: data)"
)
parser.add_argument("--download", action="store_true", help="download through torchvision")
parser.add_argument(
    "--backbone", default="efficientnet-lite0", help="backbone name or file (default: %(default)s)"
)
parser.add_argument(
    "--imbalance-ratios",
    type=float,
    nargs="+",
    default=[100, 50, 10],
    help="of the training set (default: 100 50 10)",
)
parser.add_argument(
    "--out-dir",
    type=Path,
    default=Path("cifar100_lt"),
    help="features (reused), CSV tables and the plot (default: cifar100_lt)",
)
parser.add_argument("--smoke", action="store_true", help="generated data, tiny backbone: seconds")
args = parser.parse_args()

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.features import FeatureFile, extract
from ltlearn.features.backbones import from_module
from ltlearn.features.sources import CIFARSource
from ltlearn.metrics import evaluate_test_agnostic, expected_calibration_error, shot_accuracy

backbone, ratios = args.backbone, args.imbalance_ratios
if args.smoke:
    args.data_dir = write_small_cifar100(args.out_dir / "data")
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Flatten())
    backbone = from_module(tiny.eval(), input_size=32, name="tiny random")
    ratios = [10.0]

# %%
# Extraction
# ----------
# ``CIFARSource`` reads the official pickles; ``extract`` embeds each split into one
# HDF5 file.

try:
    sources = {
        s: CIFARSource(args.data_dir, s, download=args.download, variant="cifar100")
        for s in ("train", "test")
    }
except (FileNotFoundError, ConnectionError) as exc:
    parser.error(
        f"{exc}\nEither put the official cifar-100-python directory under --data-dir, or pass "
        "--download on a machine that can reach the CIFAR host."
    )
# Only once the data is there, so that a run without it leaves no empty directory behind.
args.out_dir.mkdir(parents=True, exist_ok=True)
cache = args.out_dir / ("features_smoke.h5" if args.smoke else "features.h5")
for split, source in sources.items():
    extract(source, backbone, cache, split=split, verbose=not args.smoke)
with FeatureFile(cache) as f:
    X_pool, y_pool = f.read("train")
    X_test, y_test = f.read("test")

# %%
# The measurements
# ----------------
# At each imbalance ratio: accuracy on the balanced test set, overall and for the many
# (> 100 training images), medium and few (< 20) classes, with the expected calibration
# error; then accuracy on SADE's 11 shifted test sets.


def measure(X_pool, y_pool, X_test, y_test, ratios, out_dir, *, many=100, few=20):
    """Fit at each imbalance ratio; two tables (also written as CSV) and a plot."""
    accuracy, shifted = {}, {}
    for ratio in ratios:
        keep = long_tailed_subset(y_pool, ratio, random_state=0)
        X, y = X_pool[keep], y_pool[keep]
        bs = BalancedSoftmaxClassifier(random_state=0).fit(X, y)
        prl = PRLClassifier(random_state=0).fit(X, y)
        for name, model in (("BalancedSoftmax", bs), ("PRL", prl)):
            y_pred = model.predict(X_test)
            groups = shot_accuracy(
                y_test, y_pred, model.class_counts_, many_threshold=many, few_threshold=few
            )
            groups["ECE"] = expected_calibration_error(y_test, model.predict_proba(X_test))
            accuracy[(f"{ratio:g}", name)] = {k: 100 * v for k, v in groups.items()}
        ways = {
            "BalancedSoftmax, as trained": (bs, {}),
            "BalancedSoftmax + adapt (MAP)": (bs, {"adapt": "map"}),
            "BalancedSoftmax + true test prior (oracle)": (bs, {"oracle_prior": True}),
            "PRL, forward preference": (copy.copy(prl).set_params(preference="forward"), {}),
            "PRL, backward preference": (copy.copy(prl).set_params(preference="backward"), {}),
            "PRL + adapt (MAP)": (prl, {"adapt": "map"}),
        }
        for way, (model, options) in ways.items():
            table = evaluate_test_agnostic(model, X_test, y_test, **options)
            shifted[(f"{ratio:g}", way)] = {
                n.replace("forward_", "F").replace("backward_", "B"): 100 * v
                for n, v in table.items()
            }
    accuracy = pd.DataFrame(accuracy).T.rename_axis(["IR", "model"])
    shifted = pd.DataFrame(shifted).T.rename_axis(["IR", "way of predicting"])
    shifted["mean"] = shifted.mean(axis=1)
    accuracy.round(2).to_csv(out_dir / "accuracy.csv")
    shifted.round(2).to_csv(out_dir / "test_agnostic.csv")

    # One panel per ratio; the PRL corners stay in the table, the plot compares adaptation.
    plotted = [way for way in ways if "preference" not in way]
    figure, axes = plt.subplots(
        1, len(ratios), figsize=(8 * len(ratios), 5), squeeze=False, layout="constrained"
    )
    for ax, ratio in zip(axes[0], ratios, strict=True):
        rows = shifted.loc[f"{ratio:g}"].drop(columns="mean")
        for way in plotted:
            ax.plot(rows.columns, rows.loc[way], marker="o", label=way)
        ax.set_title(f"Training set IR {ratio:g}")
        ax.set_xlabel("test set (F: head classes frequent, B: tail classes frequent)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    figure.savefig(out_dir / "test_agnostic.png", dpi=110)
    return accuracy, shifted


accuracy, shifted = measure(X_pool, y_pool, X_test, y_test, ratios, args.out_dir)
show(accuracy.round(1))

# %%
# The shifted test sets, and the plot the script writes (``test_agnostic.png``).

show(shifted.round(1))
