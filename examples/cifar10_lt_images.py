# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
CIFAR-10-LT from the images
===========================

The whole pipeline from JPEG files: CIFAR-10 training and test images go through
EfficientNet-Lite0 (``ltlearn.features.extract``, the default CPU engine), then
BalancedSoftmaxClassifier and PRLClassifier are fitted on the long-tailed training set
and measured on the balanced test set and on SADE's shifted test sets, adapted or not.

The images come as two zips of ``<split>/<class>/<image>.jpg`` files,
``cifar10-train-jpg.zip`` and ``cifar10-test-jpg.zip``, in the folder ``--zips``
names (any folder or zip in that layout works the same way, see the getting-started
page). Only the training images of the long-tailed subset are embedded: 12,406 of them
at IR 100, plus 10,000 test images, a few minutes on 2 CPU cores. The features are
cached in ``--out-dir`` and reused on the next run.

.. code-block:: console

    python cifar10_lt_images.py --zips DIR --imbalance-ratios 100 --out-dir cifar10_lt_images
    python cifar10_lt_images.py --zips DIR --smoke

Needs the ``effnet`` extra, pandas and matplotlib
(``pip install "ltlearn[effnet]" pandas matplotlib``).
"""

import argparse
import copy
import os
import sys
import time
from pathlib import Path

# %%
# The command line
# ----------------
# By default the zips are looked for in ``shared/data/`` beside the project's checkout
# (:ref:`how to make them <cifar10-files>`).

# sphinx-gallery runs examples without __file__, from their folder.
here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
project_zips = here.parent.parent / "shared" / "data"


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


parser = argparse.ArgumentParser(description="CIFAR-10-LT from the JPEG images.")
parser.add_argument("--zips", type=Path, default=project_zips, help="folder of the two zips")
parser.add_argument(
    "--imbalance-ratios",
    type=float,
    nargs="+",
    default=[100],
    help="of the training set (default: 100)",
)
parser.add_argument(
    "--out-dir",
    type=Path,
    default=Path("cifar10_lt_images"),
    help="features (reused), CSV tables and the plot (default: cifar10_lt_images)",
)
parser.add_argument("--backbone", default="efficientnet-lite0", help="backbone name or file")
parser.add_argument("--smoke", action="store_true", help="20 images per class, in seconds")
args = parser.parse_args()
zips = [args.zips / f"cifar10-{split}-jpg.zip" for split in ("train", "test")]
for path in zips:
    if not path.exists():
        parser.error(f"{path} does not exist: pass --zips DIR (the folder of both zips)")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.features import FeatureFile, extract
from ltlearn.features.sources import ImageFolderSource
from ltlearn.metrics import evaluate_test_agnostic, expected_calibration_error, shot_accuracy

args.out_dir.mkdir(parents=True, exist_ok=True)

# %%
# Extraction
# ----------
# An image source reads the zip in place; a small ``Dataset`` picks the rows to embed,
# keeping the source's classes and image ids (which the feature file stores).

train, test = (ImageFolderSource(path) for path in zips)


class Rows(torch.utils.data.Dataset):
    """Some rows of an image source, with its classes and ids."""

    def __init__(self, source, rows):
        self.source, self.rows = source, rows
        self.classes, self.ids = source.classes, [source.ids[i] for i in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.source[self.rows[i]]


ratios = args.imbalance_ratios
if args.smoke:
    # 20 training and 10 test images per class, and a mild imbalance that 20 rows allow.
    rng = np.random.default_rng(0)

    def per_class(labels, n):
        picked = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c in range(10)]
        return np.sort(np.concatenate(picked))

    pool, test_rows = per_class(train.labels, 20), per_class(test.labels, 10)
    ratios = [2.0]
else:
    pool, test_rows = np.arange(len(train)), np.arange(len(test))
subsets = [pool[long_tailed_subset(train.labels[pool], r, random_state=0)] for r in ratios]
rows = np.unique(np.concatenate(subsets))
cache = args.out_dir / ("features_smoke.h5" if args.smoke else "features.h5")
for split, source in (("train", Rows(train, rows)), ("test", Rows(test, test_rows))):
    start = time.perf_counter()
    # A progress bar in a terminal; one line per split in the documentation build.
    extract(source, args.backbone, cache, split=split, verbose=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    print(f"{split}: {len(source)} images in {seconds:.0f} s (reused when cached)")
print(f"on {os.cpu_count()} CPU cores")
with FeatureFile(cache) as f:
    X_rows, _ = f.read("train")
    X_test, y_test = f.read("test")
# Back in their places in the pool, so that the long-tailed subsets are the same again.
X_pool = np.zeros((len(train), X_rows.shape[1]), dtype=np.float32)
X_pool[rows] = X_rows

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


accuracy, shifted = measure(X_pool[pool], train.labels[pool], X_test, y_test, ratios, args.out_dir)
show(accuracy.round(1))

# %%
# The shifted test sets: as trained, BalancedSoftmax loses accuracy as the test set
# leans towards the tail (B) or the head (F); ``adapt`` infers each test set's prior
# from its unlabeled features and comes close to being told the true prior.

show(shifted.round(1))
