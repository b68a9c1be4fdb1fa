"""
Calibration under long tails: reliability diagrams
==================================================

Calibrate a long-tailed classifier and draw reliability diagrams.

Splits a long-tailed training set 80/20 into train and calibration sets (both
long-tailed), fits a plain cross-entropy head and a BalancedSoftmaxClassifier
on the 80 %, calibrates each on the 20 % with plain temperature scaling and
with LongTailTemperatureScaler, and writes their reliability diagrams on the
balanced test set to ``reliability.png``. Uses the project's CIFAR-10 feature
file, or scikit-learn's digits when it is absent.

    python examples/calibration_reliability.py [--features FILE] [--out FILE]

Needs the ``plot`` extra (``pip install -e ".[plot]"``).
"""

import argparse
from pathlib import Path

from _cli import HelpFormatter

from ltlearn import BalancedSoftmaxClassifier, LongTailTemperatureScaler
from ltlearn._optional import import_optional
from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset, train_val_split
from ltlearn.features import read_features
from ltlearn.plotting import plot_reliability_diagram

# sphinx-gallery runs examples without __file__, from their folder.
_HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
DEFAULT = _HERE.parents[1] / "shared" / "data" / "cifar10_effnetlite0.h5"


parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
parser.add_argument(
    "--features",
    type=Path,
    help="feature file with train and test splits (default: the project's CIFAR-10 file, "
    "or scikit-learn's digits when it is absent)",
)
parser.add_argument(
    "--imbalance-ratio", type=float, default=100, help="imbalance ratio of the training set"
)
parser.add_argument("--out", type=Path, default=Path("reliability.png"), help="figure to write")
parser.add_argument(
    "--digits", action="store_true", help="use scikit-learn's digits instead (seconds)"
)
args = parser.parse_args()
if args.features is not None and not args.features.exists():
    parser.error(f"--features {args.features} does not exist")
features = None if args.digits else (args.features or DEFAULT)

if features is not None and features.exists():
    X_pool, y_pool = read_features(features, "train")
    X_test, y_test = read_features(features, "test")
    keep = long_tailed_subset(y_pool, args.imbalance_ratio, random_state=0)
    X_lt, y_lt = X_pool[keep], y_pool[keep]
else:
    if features is not None:
        print(f"{features} not found: using scikit-learn's digits, made long-tailed (IR 10).")
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
    X_lt, y_lt, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
train, cal = train_val_split(y_lt, val_size=0.2, random_state=0)

plt = import_optional("matplotlib.pyplot", "plot")
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
