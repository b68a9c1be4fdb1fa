"""
CIFAR-10-LT from the images
===========================

The whole pipeline from JPEG files: the CIFAR-10 training and test images of
``../shared/data/cifar10-train-jpg.zip`` and ``cifar10-test-jpg.zip`` (the images of the
shared feature file, same ids) go through EfficientNet-Lite0 with the default CPU
engine (the long-tailed training subset at the largest imbalance ratio asked for,
and the test set; a few minutes on 2 cores), cached in ``--out-dir`` and reused on
the next run; then BalancedSoftmaxClassifier and PRLClassifier, the test-agnostic
table, adaptation and calibration (see ``_protocol.py``). Since the features are the
shared file's, the accuracies match the feature-file route of ``cifar10_lt.py``.

    python examples/cifar10_lt_images.py [--imbalance-ratios 100] [--out-dir DIR]
"""

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _cli import HelpFormatter
from _protocol import run_protocol

from ltlearn.datasets import long_tailed_subset
from ltlearn.features import FeatureFile, extract
from ltlearn.features.sources import ImageFolderSource

# sphinx-gallery runs examples without __file__, from their folder.
_HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
SHARED = _HERE.parents[1] / "shared" / "data"


class _Rows(torch.utils.data.Dataset):
    """Some rows of an image source, keeping its classes and ids."""

    def __init__(self, source, rows):
        self.source, self.rows = source, rows
        self.classes, self.ids = source.classes, [source.ids[i] for i in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.source[self.rows[i]]


parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--zips", type=Path, default=SHARED, help="folder of the two JPEG zips")
parser.add_argument(
    "--imbalance-ratios",
    type=float,
    nargs="+",
    default=[100],
    help="CIFAR-LT profiles of the training set",
)
parser.add_argument(
    "--out-dir",
    type=Path,
    default=Path("cifar10_lt_images"),
    help="features, tables (Markdown, CSV) and plots go here; features are reused",
)
parser.add_argument("--backbone", default="efficientnet-lite0", help="backbone name or file")
parser.add_argument(
    "--smoke", action="store_true", help="a quick run on 20 images per class (for the tests)"
)
args = parser.parse_args()
zips = [args.zips / f"cifar10-{split}-jpg.zip" for split in ("train", "test")]
for path in zips:
    if not path.exists():
        parser.error(f"{path} does not exist: pass --zips DIR (the folder of both zips)")

train, test = (ImageFolderSource(path) for path in zips)
ratios = args.imbalance_ratios
rng = np.random.default_rng(0)
if args.smoke:
    # 20 training and 10 test images per class, and a mild imbalance that 20 rows allow.
    keep = np.concatenate(
        [rng.choice(np.flatnonzero(train.labels == c), 20, False) for c in range(10)]
    )
    test_rows = np.concatenate(
        [rng.choice(np.flatnonzero(test.labels == c), 10, False) for c in range(10)]
    )
    pool, ratios = np.sort(keep), [2.0]
else:
    pool, test_rows = np.arange(len(train)), np.arange(len(test))
# Only the training images of the long-tailed subsets asked for are embedded.
rows = np.unique(
    np.concatenate(
        [pool[long_tailed_subset(train.labels[pool], r, random_state=0)] for r in ratios]
    )
)
args.out_dir.mkdir(parents=True, exist_ok=True)
cache = args.out_dir / ("features_smoke.h5" if args.smoke else "features.h5")
# A progress bar on a terminal; in the documentation build, one line per split.
for split, source in (("train", _Rows(train, rows)), ("test", _Rows(test, np.sort(test_rows)))):
    start = time.perf_counter()
    extract(source, args.backbone, cache, split=split, verbose=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    print(f"{split}: {len(source)} images in {cache} after {seconds:.1f} s (reused if cached)")
machine = platform.processor() or platform.machine()
print(f"on {os.cpu_count()} CPU cores ({machine}), {date.today()}")
with FeatureFile(cache) as f:
    X_rows, _ = f.read("train")
    X_test, y_test = f.read("test")
# Back in their places in the pool, so that the long-tailed subsets are the shared ones.
X_pool = np.zeros((len(train), X_rows.shape[1]), dtype=np.float32)
X_pool[rows] = X_rows
run_protocol(X_pool[pool], train.labels[pool], X_test, y_test, ratios, args.out_dir)
