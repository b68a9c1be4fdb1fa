"""The long-tail protocol of the CIFAR-LT examples: fits, the papers' tables, plots.

Shared by ``cifar100_lt.py`` and ``cifar10_lt_images.py`` (not an example itself).
For each imbalance ratio it draws the long-tailed training set, fits
BalancedSoftmaxClassifier and PRLClassifier, and measures: uniform-test accuracy;
many / medium / few accuracy; the 11 shifted test sets of SADE's protocol for the
unadapted models, the models adapted to each test set's unlabeled features, PRL at
its three corners, and the true-prior oracle; ECE on the uniform test set before and
after LongTailTemperatureScaler (fitted on a held-out fifth of the training rows).
Tables are printed and written as Markdown and CSV beside a PNG plot.
"""

import copy
import csv
from pathlib import Path

import numpy as np
from sklearn.frozen import FrozenEstimator

from ltlearn import BalancedSoftmaxClassifier, LongTailTemperatureScaler, PRLClassifier
from ltlearn._optional import import_optional
from ltlearn.datasets import long_tailed_subset, shifted_test_subsets, train_val_split
from ltlearn.metrics import expected_calibration_error, shot_accuracy


def _pct(value):
    return "-" if np.isnan(value) else f"{100 * value:.1f}"


def run_protocol(X_pool, y_pool, X_test, y_test, ratios, out_dir, *, many=100, few=20, seed=0):
    """Fit and measure at each imbalance ratio; write tables and a plot to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subsets = shifted_test_subsets(y_test, random_state=seed)
    names = list(subsets)
    main_rows, shifted_rows = [], []
    for ratio in ratios:
        idx = long_tailed_subset(y_pool, ratio, random_state=seed)
        X, y = X_pool[idx], y_pool[idx]
        fit_rows, cal_rows = train_val_split(y, val_size=0.2, random_state=seed)
        bs = BalancedSoftmaxClassifier(random_state=seed).fit(X, y)
        prl = PRLClassifier(random_state=seed).fit(X, y)
        counts = bs.class_counts_
        for name, model in (("BalancedSoftmaxClassifier", bs), ("PRLClassifier", prl)):
            shots = shot_accuracy(
                y_test, model.predict(X_test), counts, many_threshold=many, few_threshold=few
            )
            # Calibration: the temperature is fitted on rows the model did not see.
            held = type(model)(random_state=seed).fit(X[fit_rows], y[fit_rows])
            scaler = LongTailTemperatureScaler(FrozenEstimator(held)).fit(X[cal_rows], y[cal_rows])
            before = expected_calibration_error(y_test, held.predict_proba(X_test))
            after = expected_calibration_error(y_test, scaler.predict_proba(X_test))
            main_rows.append(
                [f"{ratio:g}", name, *(shots[k] for k in ("overall", "many", "medium", "few"))]
                + [before, after]
            )

        table = _shifted_table(bs, prl, X_test, y_test, subsets)
        for model, values in table.items():
            shifted_rows.append([f"{ratio:g}", model, *values, float(np.mean(values))])

    header = ["IR", "model", "uniform", "many", "medium", "few", "ECE", "ECE calibrated"]
    short = [n.replace("forward_", "F").replace("backward_", "B") for n in names]
    shifted_header = ["IR", "model", *short, "mean"]
    _write(out_dir / "accuracy", header, main_rows)
    _write(out_dir / "test_agnostic", shifted_header, shifted_rows)
    _plot(out_dir / "test_agnostic.png", short, shifted_rows)
    return main_rows, shifted_rows


def _shifted_table(bs, prl, X_test, y_test, subsets):
    """Accuracy of each way of predicting on each shifted test set."""

    def accuracy(predict):
        return [np.mean(predict(i) == y_test[i]) for i in subsets.values()]

    def adapted(model, i):
        return copy.copy(model).adapt(X_test[i]).predict(X_test[i])

    scores = bs.decision_function(X_test)
    n_classes = len(bs.classes_)
    return {
        "BalancedSoftmax, unadapted": accuracy(lambda i: bs.predict(X_test[i])),
        "BalancedSoftmax + adapt (MAP)": accuracy(lambda i: adapted(bs, i)),
        "PRL, forward": accuracy(lambda i: prl.predict(X_test[i], preference="forward")),
        "PRL, uniform": accuracy(lambda i: prl.predict(X_test[i], preference="uniform")),
        "PRL, backward": accuracy(lambda i: prl.predict(X_test[i], preference="backward")),
        "PRL + adapt (MAP)": accuracy(lambda i: adapted(prl, i)),
        "BalancedSoftmax + true test prior (oracle)": accuracy(
            lambda i: np.argmax(
                scores[i] + np.log(np.maximum(_prior(y_test[i], n_classes), 1e-12)), axis=1
            )
        ),
    }


def _prior(y, n_classes):
    counts = np.bincount(y, minlength=n_classes)
    return counts / counts.sum()


def _write(stem, header, rows):
    """Print a table, and write it as Markdown and CSV."""
    cells = [[c if isinstance(c, str) else _pct(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    text = "\n".join(lines)
    print("\n" + text)
    Path(f"{stem}.md").write_text(text + "\n")
    with open(f"{stem}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *cells])


def _plot(path, names, rows):
    plt = import_optional("matplotlib.pyplot", "plot")
    ratios = sorted({row[0] for row in rows}, key=float, reverse=True)
    figure, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 3.6), squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        for row in rows:
            if row[0] == ratio:
                ax.plot(range(len(names)), 100 * np.array(row[2:-1]), marker=".", label=row[1])
        ax.set_xticks(range(len(names)), names, rotation=45)
        ax.set_title(f"IR {ratio}: accuracy over the shifted test sets")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"\nwrote {path}")
