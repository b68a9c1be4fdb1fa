# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
Extracting features from Python, fitting from the file
======================================================

The first step of the workflow without the command line: a frozen network (here a tiny
random one; any ``torch.nn.Module`` works) embeds images from a torch ``Dataset`` into
an HDF5 feature file with ``ltlearn.features.extract``. A classifier then trains
straight from the file, streaming it in blocks: the same fit as from arrays in memory,
for files larger than memory. Last, a synthetic file of any size, written and fitted
without ever holding it in memory.

Runs in seconds; the files go to a temporary directory unless ``--out-dir`` names one:

.. code-block:: console

    python features_out_of_core.py
    python features_out_of_core.py --out-dir features --rows 20000000

Needs Pillow, pandas and matplotlib (``pip install pillow pandas matplotlib``).
"""

import argparse
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Extract features from Python into a file, and fit from the file."
)
parser.add_argument(
    "--out-dir", type=Path, help="where the feature files go (default: a temporary directory)"
)
parser.add_argument(
    "--rows",
    type=int,
    default=100_000,
    help="rows of the synthetic file of the last part (default: 100000)",
)
args = parser.parse_args()
if args.rows < 1000:
    parser.error(f"--rows must be at least 1000 (10 classes, a long tail); got {args.rows}")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import load_long_tailed_digits, make_long_tailed_embeddings
from ltlearn.features import FeatureFile, extract, read_metadata
from ltlearn.features.backbones import from_module
from ltlearn.plotting import PerClassAccuracyDisplay


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


# Removed when the script ends, unless --out-dir names a directory to keep.
workdir = None if args.out_dir else tempfile.TemporaryDirectory(prefix="ltlearn-example-")
out_dir = args.out_dir or Path(workdir.name)
out_dir.mkdir(parents=True, exist_ok=True)

# %%
# Images in a torch Dataset
# -------------------------
# ``extract`` reads image folders, zips, CIFAR directories and list files by path, and
# any ``Dataset`` of ``(PIL image, label)`` pairs with a ``classes`` list. Here the 8 x 8
# digits, their training half made long-tailed (IR 10), their test half balanced.

digits = load_long_tailed_digits(imbalance_ratio=10, random_state=0)


class DigitImages(torch.utils.data.Dataset):
    """Rows of digit pixels (0 to 16) as 8 x 8 RGB images, with their labels."""

    classes = [str(d) for d in range(10)]

    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        grey = np.uint8(self.pixels[i].reshape(8, 8) * 255 / 16)
        return Image.fromarray(grey).convert("RGB"), int(self.labels[i])


train_images = DigitImages(digits.X_train, digits.y_train)
test_images = DigitImages(digits.X_test, digits.y_test)
print(f"{len(train_images)} training images, {len(test_images)} test images")

# %%
# A backbone, and the extraction
# ------------------------------
# :func:`~ltlearn.features.backbones.from_module` wraps a module with its
# preprocessing (resize to ``input_size``, normalise). A pretrained network is what
# gives useful features: ``efficientnet_lite0()``, ``open_clip_backbone(...)``,
# ``torchvision_backbone(...)``, or a name such as ``"efficientnet-lite0"`` in place of
# the backbone. Random convolutions, pooled, are enough for digits. ``engine="torch"``:
# exporting so small a network to ONNX would take longer than running it.

torch.manual_seed(0)
network = torch.nn.Sequential(
    torch.nn.Conv2d(3, 64, kernel_size=3, padding=1),
    torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(4),
    torch.nn.Flatten(),
)
backbone = from_module(
    network, input_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), name="random convolutions"
)
path = out_dir / "digits_features.h5"
for split, images in (("train", train_images), ("test", test_images)):
    extract(images, backbone, path, split=split, engine="torch", verbose=False)

metadata = read_metadata(path)
print("provenance:", {k: metadata["attrs"][k] for k in ("backbone", "weights", "preprocessing")})
show(pd.DataFrame(metadata["splits"]).T)

# %%
# The file keeps the features in float16 with the class names, an id per row and where
# the features came from; ``extract`` resumes an interrupted run, skips a finished one,
# and refuses to mix features of another backbone into the file.

# %%
# Fitting from the file
# ---------------------
# Given a split of the file (``f["train"]``, a :class:`~ltlearn.features.FeatureSplit`)
# instead of an array, ``fit`` streams it: each epoch visits the file's chunks (1,024
# rows) in a shuffled order, 16 at a time, and the labels come from the file. When all
# rows fit in one block, as here, the streamed fit is the in-memory fit, batch for
# batch.

# calibration_cv=None: these models are not adapted to a test set (see the example on
# shifted test sets), so they skip the calibration that adapt() reads.
with FeatureFile(path) as f:
    streamed = BalancedSoftmaxClassifier(calibration_cv=None, random_state=0).fit(f["train"])
    X_train, y_train = f.read("train")
    X_test, y_test = f.read("test")
in_memory = BalancedSoftmaxClassifier(calibration_cv=None, random_state=0).fit(X_train, y_train)
same = np.array_equal(streamed.predict(X_test), in_memory.predict(X_test))
print(f"balanced test accuracy: {streamed.score(X_test, y_test):.3f}")
print("streamed and in-memory fits predict the same:", same)

# %%
# Accuracy per class against its number of training rows: the random features and a
# Balanced Softmax head hold up in the rarest classes.

display = PerClassAccuracyDisplay.from_estimator(
    streamed, X_test, y_test, many_threshold=50, few_threshold=20, name="streamed fit"
)
display.ax_.set_title("Random convolutions on digits, a head fitted from the file")

# %%
# Larger than memory
# ------------------
# :func:`~ltlearn.datasets.make_long_tailed_embeddings` writes a synthetic long-tailed
# file block by block, so it never holds the rows either (``--rows`` sets its size).
# The fit streams it the same way; predictions too can go through the file chunk by
# chunk (``iter_chunks``). Memory holds a few blocks of the file, never the file.

big = out_dir / "synthetic_features.h5"
start = time.perf_counter()
make_long_tailed_embeddings(
    args.rows, 64, 100, imbalance_ratio=100, noise=2.0, random_state=0, path=big, overwrite=True
)
written = time.perf_counter() - start
with FeatureFile(big) as f:
    split = f["train"]
    start = time.perf_counter()
    clf = BalancedSoftmaxClassifier(calibration_cv=None, random_state=0).fit(split)
    fitted = time.perf_counter() - start
    # Balanced accuracy on the file's rows, a chunk at a time.
    correct, total = np.zeros(100), np.zeros(100)
    for X, y in f.iter_chunks("train"):
        np.add.at(correct, y, clf.predict(X) == y)
        np.add.at(total, y, 1)
block_mb = split.block_chunks * split.chunk_rows * split.shape[1] * 4 / 1e6
show(
    pd.Series(
        {
            "rows x features": f"{split.shape[0]:,} x {split.shape[1]}",
            "file size on disk (MB)": round(big.stat().st_size / 1e6, 1),
            "in memory as float32 (MB)": round(split.shape[0] * split.shape[1] * 4 / 1e6, 1),
            "one block in memory (MB)": round(block_mb, 1),
            "training rows per class": f"{clf.class_counts_.max()} to {clf.class_counts_.min()}",
            "written in (s)": round(written, 1),
            "fitted in (s)": round(fitted, 1),
            "balanced accuracy on the file's rows": round(np.mean(correct / total), 3),
        }
    ).to_frame("")
)

# %%
# The balanced accuracy is measured on the file's own rows: a synthetic file has no
# test split.

if workdir is not None:
    workdir.cleanup()

plt.show()  # a window when run as a script; nothing under a non-interactive backend
