# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
Calibration under long tails: reliability diagrams
==================================================

Calibrate long-tailed classifiers and draw their reliability diagrams on the balanced
test set: a plain cross-entropy head and a BalancedSoftmaxClassifier, each calibrated by
plain temperature scaling and by LongTailTemperatureScaler.

It reads any feature file with ``train`` and ``test`` splits (``ltlearn extract`` writes
one); without one it uses scikit-learn's digits, made long-tailed, and runs in seconds:

.. code-block:: console

    python calibration_reliability.py --features FILE --out reliability.png
    python calibration_reliability.py --digits

Needs matplotlib (``pip install matplotlib``).
"""

import argparse
from pathlib import Path

# %%
# The data
# --------
# By default the script looks for the project's CIFAR-10 EfficientNet-Lite0 embeddings
# in ``shared/data/`` beside its checkout (:ref:`how to make that file <cifar10-files>`);
# pass ``--features FILE`` for your own file, or ``--digits``. The
# long-tailed training set is split 80 / 20 into a training and a calibration set, both
# long-tailed.

# sphinx-gallery runs examples without __file__, from their folder.
here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
project_file = here.parent.parent / "shared" / "data" / "cifar10_effnetlite0.h5"

parser = argparse.ArgumentParser(description="Reliability diagrams of long-tailed classifiers.")
parser.add_argument("--features", type=Path, help="feature file with train and test splits")
parser.add_argument(
    "--imbalance-ratio", type=float, default=100, help="of the training set (default: 100)"
)
parser.add_argument(
    "--out", type=Path, default=Path("reliability.png"), help="figure (default: reliability.png)"
)
parser.add_argument("--digits", action="store_true", help="use scikit-learn's digits (seconds)")
args = parser.parse_args()
if args.features is not None and not args.features.exists():
    parser.error(f"--features {args.features} does not exist")
features = args.features or (None if args.digits or not project_file.exists() else project_file)

import matplotlib.pyplot as plt

from ltlearn import BalancedSoftmaxClassifier, LongTailTemperatureScaler
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset, train_val_split
from ltlearn.features import read_features
from ltlearn.plotting import plot_reliability_diagram

if features is not None:
    X_pool, y_pool = read_features(features, "train")
    X_test, y_test = read_features(features, "test")
    keep = long_tailed_subset(y_pool, args.imbalance_ratio, random_state=0)
    X_lt, y_lt = X_pool[keep], y_pool[keep]
else:
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X_lt, y_lt, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
train, cal = train_val_split(y_lt, val_size=0.2, random_state=0)

# %%
# Calibrate and draw
# ------------------
# ``weighting="none"`` is plain temperature scaling: on a long-tailed calibration set
# it fits the head classes. LongTailTemperatureScaler weights the calibration rows so
# that every class counts alike, which is what a balanced test set asks for. Each column
# is one model: its reliability diagram above, the number of test rows per confidence
# bin below.

figure, axes = plt.subplots(
    2, 4, figsize=(18, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
)
panels = []
for head, tau in (("plain cross-entropy head", 0.0), ("BalancedSoftmaxClassifier", 1.0)):
    clf = BalancedSoftmaxClassifier(tau=tau, random_state=0).fit(X_lt[train], y_lt[train])
    plain = LongTailTemperatureScaler(clf, weighting="none").fit(X_lt[cal], y_lt[cal])
    long_tail = LongTailTemperatureScaler(clf).fit(X_lt[cal], y_lt[cal])
    panels += [
        (f"{head}\nplain temperature scaling (T={plain.temperature_:.2f})", plain),
        (f"{head}\nLongTailTemperatureScaler (T={long_tail.temperature_:.2f})", long_tail),
    ]
for column, (title, model) in enumerate(panels):
    plot_reliability_diagram(y_test, model.predict_proba(X_test), title=title, axes=axes[:, column])
figure.tight_layout()
figure.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
