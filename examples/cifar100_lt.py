"""
CIFAR-100-LT, the whole pipeline
================================

The standard benchmark of long-tail papers, from the official ``cifar-100-python``
directory to the papers' tables: long-tailed training sets at IR 100, 50 and 10 (the
CIFAR-LT profile), features from the backbone named by ``--backbone`` (an open_clip
model when its weights can be had, EfficientNet-Lite0 offline), cached in ``--out-dir``
and reused on the next run; BalancedSoftmaxClassifier, PRLClassifier at its corners,
adaptation to each test set's unlabeled features, and calibration (see
``_protocol.py``). Tables go to the terminal and to Markdown and CSV files beside a PNG
plot.

The data: ``--data-dir`` holding ``cifar-100-python/`` (as torchvision lays it out), or
``--download`` to fetch it through torchvision when the machine is online. The full
run was not made on the project's machine, which cannot download CIFAR-100;
``--smoke`` runs the same code on a small generated directory in the official format
with a tiny random backbone, in seconds (the test suite runs it).

    python examples/cifar100_lt.py --data-dir DIR [--backbone efficientnet-lite0]
"""

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch
from _cli import HelpFormatter
from _protocol import run_protocol

from ltlearn.features import FeatureFile, extract
from ltlearn.features.backbones import from_module
from ltlearn.features.sources import CIFARSource


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


parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument("--data-dir", type=Path, default=Path("data"), help="holds cifar-100-python/")
parser.add_argument("--download", action="store_true", help="download through torchvision")
parser.add_argument("--backbone", default="efficientnet-lite0", help="backbone name or file")
parser.add_argument(
    "--imbalance-ratios",
    type=float,
    nargs="+",
    default=[100, 50, 10],
    help="CIFAR-LT profiles of the training set",
)
parser.add_argument(
    "--out-dir",
    type=Path,
    default=Path("cifar100_lt"),
    help="features, tables (Markdown, CSV) and plots go here; features are reused",
)
parser.add_argument(
    "--smoke", action="store_true", help="generated data and a tiny backbone, in seconds"
)
args = parser.parse_args()

args.out_dir.mkdir(parents=True, exist_ok=True)
backbone, ratios = args.backbone, args.imbalance_ratios
if args.smoke:
    args.data_dir = write_small_cifar100(args.out_dir / "data")
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Flatten())
    backbone = from_module(tiny.eval(), input_size=32, name="tiny random")
    ratios = [10.0]
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
cache = args.out_dir / ("features_smoke.h5" if args.smoke else "features.h5")
for split, source in sources.items():
    extract(source, backbone, cache, split=split, verbose=not args.smoke)
with FeatureFile(cache) as f:
    X_pool, y_pool = f.read("train")
    X_test, y_test = f.read("test")
# CIFAR-100-LT's usual groups: many > 100, few < 20 training images.
run_protocol(X_pool, y_pool, X_test, y_test, ratios, args.out_dir, many=100, few=20)
