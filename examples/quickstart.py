# The command line is parsed before the imports that load torch: --help answers at once.
# ruff: noqa: E402
"""
Quick start
===========

A long-tailed classifier: its accuracy per group of classes, its long-tail scores
estimated by cross-validation, given a test prior and inferring one.

Runs in seconds on scikit-learn's digits made long-tailed (IR 10):

.. code-block:: console

    python quickstart.py
"""

import argparse

argparse.ArgumentParser(description="ltlearn's quick start, on scikit-learn's digits.").parse_args()

import matplotlib.pyplot as plt
import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_validate

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.datasets import load_long_tailed_digits, shifted_test_subsets
from ltlearn.metrics import SCORERS, make_shot_scorer, shot_accuracy

# %%
# A long-tailed training set, a balanced test set
# -----------------------------------------------
# The estimators fit and predict like any scikit-learn classifier; by default they
# predict for a balanced test set.

data = load_long_tailed_digits(imbalance_ratio=10, random_state=0)
print("training samples per class:", data.class_counts.tolist())

clf = BalancedSoftmaxClassifier(random_state=0).fit(data.X_train, data.y_train)
print(f"balanced test accuracy: {clf.score(data.X_test, data.y_test):.3f}")
groups = shot_accuracy(
    data.y_test, clf.predict(data.X_test), clf.class_counts_, many_threshold=50, few_threshold=20
)
print("overall / many / medium / few:", {k: round(v, 3) for k, v in groups.items()})

# %%
# Scored for a long tail, from the training set alone
# ----------------------------------------------------
# The estimators are scikit-learn classifiers: ``cross_validate``, ``Pipeline`` and
# ``GridSearchCV`` take them, and the scorers of ``ltlearn.metrics`` score them for a
# long tail. Balanced accuracy on long-tailed validation folds estimates the accuracy on
# a balanced test set, before there is one; few-shot accuracy is the mean accuracy of
# the rarest classes. (The grid search example tunes a pipeline with these scorers.)

scoring = {
    "balanced_accuracy": SCORERS["balanced_accuracy"],
    # Digits is small: its "many" classes have 50 or more samples, its "few" 20 or fewer.
    "few_shot_accuracy": make_shot_scorer("few", many_threshold=50, few_threshold=20),
}
# calibration_cv=None: these fits are never adapted, so they skip the calibration that
# adapt() reads (three fits fewer each).
folds = cross_validate(
    BalancedSoftmaxClassifier(calibration_cv=None, random_state=0),
    data.X_train,
    data.y_train,
    scoring=scoring,
    cv=StratifiedKFold(3, shuffle=True, random_state=0),
)
print(
    f"3-fold CV on the training set: balanced accuracy "
    f"{folds['test_balanced_accuracy'].mean():.3f}, "
    f"few-shot accuracy {folds['test_few_shot_accuracy'].mean():.3f}"
)
print(
    f"the balanced test set:         accuracy {groups['overall']:.3f}, "
    f"few-shot accuracy {groups['few']:.3f}"
)

# %%
# A known test prior
# ------------------
# A known test distribution shifts the predictions without refitting: here a test
# set as skewed as the training set (SADE's "forward 10" set).

skewed = shifted_test_subsets(data.y_test, imbalance_ratios=[10])["forward_10"]
X_skewed, y_skewed = data.X_test[skewed], data.y_test[skewed]
print(f"skewed test set, uniform prior assumed: {clf.score(X_skewed, y_skewed):.3f}")
clf.set_params(test_prior="train")
print(f"skewed test set, training prior given:  {clf.score(X_skewed, y_skewed):.3f}")

# %%
# An unknown test prior
# ---------------------
# An unknown test distribution is inferred from the unlabeled test features:
# ``adapt()`` estimates the class prior (MAP label-shift estimation) and predicts for it.

clf = clf.set_params(test_prior=None).adapt(X_skewed)
print(f"skewed test set, prior inferred by adapt: {clf.score(X_skewed, y_skewed):.3f}")
print("  estimated class prior:", clf.test_prior_.round(2).tolist())

# %%
# The estimated prior against the true one:

classes = np.arange(len(clf.classes_))
true_prior = np.bincount(y_skewed, minlength=len(classes)) / len(y_skewed)
figure, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
ax.bar(classes - 0.2, true_prior, 0.4, label="true class prior of the skewed test set")
ax.bar(classes + 0.2, clf.test_prior_, 0.4, label="estimated by adapt() from its features")
ax.set_xticks(classes)
ax.set_xlabel("class (largest in training first)")
ax.set_ylabel("share of the test set")
ax.legend()
