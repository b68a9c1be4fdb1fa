# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
Long-tail methods side by side
==============================

The multi-expert family (SADE, RIDE, SHIKE) and the decoupled classifiers (cRT,
tau-normalisation, LWS) against Balanced Softmax and a plain cross-entropy head, all at
their defaults on the same long-tailed training sets: accuracy overall and per group of
classes, calibration and fit time, averaged over a few draws of the data; then where
each method gains, class by class.

Runs in under half a minute on scikit-learn's digits made long-tailed (IR 10):

.. code-block:: console

    python long_tail_methods.py
    python long_tail_methods.py --seeds 10

Needs pandas and matplotlib (``pip install pandas matplotlib``).
"""

import argparse
import time

parser = argparse.ArgumentParser(
    description="Long-tail methods side by side, on scikit-learn's digits made long-tailed."
)
parser.add_argument(
    "--seeds", type=int, default=3, help="draws of the training and test sets (default: 3)"
)
args = parser.parse_args()
if args.seeds < 1:
    parser.error(f"--seeds must be at least 1; got {args.seeds}")

import matplotlib.pyplot as plt
import pandas as pd

from ltlearn import (
    BalancedSoftmaxClassifier,
    DecoupledClassifier,
    RIDEClassifier,
    SADEClassifier,
    SHIKEClassifier,
)
from ltlearn.datasets import load_long_tailed_digits
from ltlearn.metrics import expected_calibration_error, shot_accuracy
from ltlearn.plotting import PerClassAccuracyDisplay


def show(table):
    """Print a table in a terminal; the documentation and notebooks show it as HTML."""
    if "__file__" not in globals():
        return table
    print(table.to_string())


# %%
# The methods
# -----------
# Every one is a scikit-learn classifier with the same ``fit`` and ``predict``, trained
# by the same loop; only the loss and the heads differ. ``calibration_cv=None``: these
# fits are never adapted to a test set, so they skip the calibration that ``adapt``
# reads (RIDE, SHIKE and the decoupled classifiers do not calibrate). SHIKE fuses
# several depths of a backbone (``extract(..., layers=[...])``); digits have one, the
# pixels, which each expert then fuses with itself.


def methods():
    return {
        "cross-entropy": BalancedSoftmaxClassifier(tau=0.0, calibration_cv=None, random_state=0),
        "Balanced Softmax": BalancedSoftmaxClassifier(calibration_cv=None, random_state=0),
        "SADE": SADEClassifier(calibration_cv=None, random_state=0),
        "RIDE": RIDEClassifier(random_state=0),
        "SHIKE": SHIKEClassifier(random_state=0),
        "cRT": DecoupledClassifier("crt", random_state=0),
        "tau-normalisation": DecoupledClassifier("tau_norm", random_state=0),
        "LWS": DecoupledClassifier("lws", random_state=0),
    }


# %%
# Accuracy, calibration and fit time
# ----------------------------------
# Each draw splits the digits in two halves, makes the training half long-tailed (87
# rows in the largest class, 8 in the smallest) and keeps the test half balanced. With
# ten classes, "many" means more than 50 training rows and "few" fewer than 20. Means
# over the draws; ECE is the expected calibration error of ``predict_proba``.

results, first_draw = [], {}
for seed in range(args.seeds):
    data = load_long_tailed_digits(imbalance_ratio=10, random_state=seed)
    for name, model in methods().items():
        start = time.perf_counter()
        model.fit(data.X_train, data.y_train)
        seconds = time.perf_counter() - start
        groups = shot_accuracy(
            data.y_test,
            model.predict(data.X_test),
            model.class_counts_,
            many_threshold=50,
            few_threshold=20,
        )
        ece = expected_calibration_error(data.y_test, model.predict_proba(data.X_test))
        results.append({"method": name, **groups, "ECE": ece, "seconds": seconds})
        if seed == 0:
            first_draw[name] = model
    if seed == 0:
        X_test, y_test = data.X_test, data.y_test
results = pd.DataFrame(results)
means = results.groupby("method", sort=False).mean()
table = pd.DataFrame(
    {
        "accuracy %": 100 * means["overall"],
        "many %": 100 * means["many"],
        "medium %": 100 * means["medium"],
        "few %": 100 * means["few"],
        "ECE %": 100 * means["ECE"],
        "fit (s)": means["seconds"],
    }
)
spread = 100 * results.groupby("method", sort=False)["overall"].std().max()
if args.seeds > 1:
    print(f"{args.seeds} draws; standard deviation of the accuracy: at most {spread:.1f} points")
show(table.round(2))

# %%
# Re-balancing the loss (Balanced Softmax, SADE) or the classifier (cRT) lifts the few
# classes well above cross-entropy, for some points of the many. RIDE and SHIKE put a
# small residual adapter in front of each expert's head: on raw pixels that is capacity
# a linear head lacks, and they keep more of the many classes. Tau-normalisation and LWS
# rescale the head that cross-entropy trained and barely move the few classes here: on
# normalised features the training prior sits mostly in the weights' directions, not
# their norms. Calibration varies more than accuracy and can be repaired after the fit
# (``LongTailTemperatureScaler``, see the calibration example).
#
# Digits are pixels, not the embeddings of a pretrained backbone. On frozen CIFAR-10
# embeddings, where a linear head is already good, the multi-expert systems came within
# about a point of Balanced Softmax given the same features, at up to thirty times its
# fit time (:doc:`the user guide </guide>`, "More long-tail methods").

# %%
# Where the gains are, class by class
# -----------------------------------
# On the first draw: each class's test accuracy against its number of training rows,
# with each group's mean dashed. Cross-entropy is at its best on the frequent classes
# and its worst on the rarest; the re-balanced models trade a little of the first for
# much of the second.

display = None
for name in ("cross-entropy", "Balanced Softmax", "RIDE"):
    display = PerClassAccuracyDisplay.from_estimator(
        first_draw[name],
        X_test,
        y_test,
        many_threshold=50,
        few_threshold=20,
        name=name,
        ax=None if display is None else display.ax_,
    )
display.ax_.set_title("Re-balancing lifts the rarest classes")

plt.show()  # a window when run as a script; nothing under a non-interactive backend
