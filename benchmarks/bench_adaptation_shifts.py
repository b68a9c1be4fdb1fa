"""Adaptation on several data sets and shift families: does ``adapt()`` ever hurt?

Extends ``bench_adaptation.py`` (SADE's 11 test sets on CIFAR-10-LT) beyond
one protocol. Data sets: the shared CIFAR-10 EfficientNet-Lite0 embeddings at
IR 100 and 10 (the real test set), the README quick start's long-tailed
digits (IR 10, seeds 0-3, the balanced test half), and synthetic
``make_long_tailed_embeddings`` problems (20 classes, IR 50) with the default
head and with a badly calibrated one (``weight_decay=1``). Shifts drawn from
each test pool: none (the balanced pool), training-like, SADE's forward and
backward 50 ... 2, Dirichlet class priors (concentrations 1 and 0.3, three
draws each) and one or two classes absent. Unlabeled rows: 30, 100, 1,000 and
all (three draws of a sample; the prior is estimated on the sample and the
whole shifted set is scored).

Estimators, each with ``adapt()``'s defaults: BalancedSoftmaxClassifier,
PRLClassifier, SADEClassifier (CIFAR-10 only) and scikit-learn's
LogisticRegression through ``estimate_test_prior(..., significance=0.05)``.
Columns: mean accuracy unadapted, adapted and with the oracle shift
(``log`` of the true prior added to the unadapted balanced logits), the worst
adapted-minus-unadapted over the shifts, the share of shifted sets on which a
shift was detected, the mean total-variation error of the estimated prior,
and the share of classes whose 90 % interval covers the shifted set's true
class frequencies. Then the time of one ``adapt`` on 10,000 rows against one
``predict`` of the same rows.

    python benchmarks/bench_adaptation_shifts.py [--quick]
"""

import argparse
import copy
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier, SADEClassifier
from ltlearn.adaptation import estimate_test_prior
from ltlearn.datasets import (
    load_long_tailed_digits,
    long_tailed_subset,
    make_long_tailed_embeddings,
)
from ltlearn.features import read_features

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ROOT.parent / "shared/data/cifar10_effnetlite0.h5"
SIZES = (30, 100, 1000, None)


def shift_priors(n_classes, train_prior, rng):
    """Named class priors of the test sets, each summing to one."""
    priors = {"none": np.full(n_classes, 1.0 / n_classes), "train-like": train_prior}
    for ratio in (50, 25, 10, 5, 2):
        w = float(ratio) ** (-np.arange(n_classes) / (n_classes - 1))
        priors[f"F{ratio}"] = w / w.sum()
        priors[f"B{ratio}"] = w[::-1] / w.sum()
    for concentration in (1.0, 0.3):
        for j in range(3):
            priors[f"Dir{concentration:g}-{j}"] = rng.dirichlet(np.full(n_classes, concentration))
    for absent in (1, 2):
        q = np.ones(n_classes)
        q[rng.choice(n_classes, absent, replace=False)] = 0
        priors[f"absent{absent}"] = q / q.sum()
    return priors


def shifted_rows(y, prior, rng):
    """The largest subset of a pool whose class frequencies follow ``prior``."""
    available = np.bincount(y, minlength=len(prior))
    scale = np.min(available[prior > 0] / prior[prior > 0])
    counts = np.floor(prior * scale).astype(int)
    return np.concatenate(
        [rng.choice(np.flatnonzero(y == c), k, replace=False) for c, k in enumerate(counts) if k]
    )


class Model:
    """One fitted estimator: its unadapted predictions, adapt, and the oracle."""

    def __init__(self, name, estimator, X_train, y_train):
        self.name = name
        start = time.perf_counter()
        self.estimator = estimator.fit(X_train, y_train)
        self.fit_seconds = time.perf_counter() - start
        self.prior = np.bincount(y_train) / len(y_train)
        self.sklearn = not hasattr(estimator, "adapt")

    def scores(self, X):
        if self.sklearn:  # the balanced logits of a classifier fitted for the training prior
            proba = self.estimator.predict_proba(X)
            return np.log(np.maximum(proba, 1e-300)) - np.log(self.prior)
        return self.estimator.decision_function(X)

    def adapted(self, X_unlabeled, X_scored):
        """(predictions on X_scored, estimated prior, interval, shift detected)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.sklearn:
                d = estimate_test_prior(
                    self.estimator,
                    X_unlabeled,
                    source_prior=self.prior,
                    significance=0.05,
                    return_details=True,
                )
                with np.errstate(divide="ignore"):
                    pred = np.argmax(self.scores(X_scored) + np.log(d.prior), axis=1)
                return pred, d.estimate, d.interval, d.shift_detected
            model = copy.copy(self.estimator).adapt(X_unlabeled)
        return (
            model.predict(X_scored),
            model.test_prior_,
            model.test_prior_interval_,
            model.shift_detected_,
        )


def evaluate(models, X_pool, y_pool, draws, seed):
    """Per model and size: accumulated statistics over shift families."""
    n_classes = int(y_pool.max()) + 1
    rng = np.random.default_rng(seed)
    priors = shift_priors(n_classes, models[0].prior, rng)
    subsets = {name: shifted_rows(y_pool, q, rng) for name, q in priors.items()}
    out = {}
    for model in models:
        base_scores = model.scores(X_pool)
        for size in SIZES:
            rows = []
            for name, idx in subsets.items():
                y = y_pool[idx]
                truth = np.bincount(y, minlength=n_classes) / len(y)
                unadapted = np.mean(np.argmax(base_scores[idx], axis=1) == y)
                with np.errstate(divide="ignore"):
                    oracle = np.mean(np.argmax(base_scores[idx] + np.log(truth), axis=1) == y)
                if size is not None and size >= len(idx):
                    continue  # the whole set: the 'all' row already has it
                for draw in range(1 if size is None else draws):
                    r = np.random.default_rng([seed, draw, size or 0])
                    sample = idx if size is None else r.choice(idx, size, replace=False)
                    pred, estimate, interval, detected = model.adapted(X_pool[sample], X_pool[idx])
                    cover = (interval[0] <= truth) & (truth <= interval[1])
                    rows.append(
                        dict(
                            shift=name,
                            n_rows=len(idx),
                            unadapted=unadapted,
                            adapted=np.mean(pred == y),
                            oracle=oracle,
                            tv=0.5 * np.abs(estimate - truth).sum(),
                            detected=detected,
                            cover=np.mean(cover) if np.all(np.isfinite(interval)) else np.nan,
                        )
                    )
            if rows:
                out[(model.name, size)] = rows
    return out


def summarise(title, results):
    print(f"\n### {title}\n")
    print(
        "| model | unlabeled rows | unadapted | adapted | oracle | adapted - unadapted on "
        "no shift | worst adapted - unadapted | shifts detected | prior TV x100 | 90 % "
        "interval coverage | shifted sets (rows) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, size), rows in results.items():
        shifts = sorted({r["shift"] for r in rows})
        mean = {
            key: np.mean([np.mean([r[key] for r in rows if r["shift"] == s]) for s in shifts])
            for key in ("unadapted", "adapted", "oracle", "tv")
        }
        per_shift = [
            np.mean([r["adapted"] - r["unadapted"] for r in rows if r["shift"] == s])
            for s in shifts
        ]
        none = [r["adapted"] - r["unadapted"] for r in rows if r["shift"] == "none"]
        shifted = [r["detected"] for r in rows if r["shift"] not in ("none",)]
        cover = [r["cover"] for r in rows if np.isfinite(r["cover"])]
        n_rows = [r["n_rows"] for r in rows]
        none = f"{100 * np.mean(none):+.2f}" if none else "-"
        print(
            f"| {name} | {size or 'all'} | {100 * mean['unadapted']:.2f} | "
            f"{100 * mean['adapted']:.2f} | {100 * mean['oracle']:.2f} | {none} | "
            f"{100 * min(per_shift):+.2f} | {np.mean(shifted):.2f} | {100 * mean['tv']:.1f} | "
            f"{np.mean(cover):.2f} | {len(shifts)} ({min(n_rows):,}-{max(n_rows):,}) |"
        )


def cifar(ir, sade, draws):
    X, y = read_features(FEATURES, "train")
    X_test, y_test = read_features(FEATURES, "test")
    keep = long_tailed_subset(y, ir, random_state=0)
    models = [
        Model("BalancedSoftmax", BalancedSoftmaxClassifier(random_state=0), X[keep], y[keep]),
        Model("PRL", PRLClassifier(random_state=0), X[keep], y[keep]),
        Model(
            "LogisticRegression C=0.003",
            LogisticRegression(C=0.003, max_iter=2000),
            X[keep],
            y[keep],
        ),
    ]
    if sade:
        models.append(Model("SADE", SADEClassifier(random_state=0), X[keep], y[keep]))
    return models, X_test, y_test


def median_seconds(step, repeats=5):
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_adapt(model, X):
    bs = model.estimator
    predict = median_seconds(lambda: bs.predict(X))
    adapt = median_seconds(lambda: copy.copy(bs).adapt(X))
    print(
        f"\n{len(X):,} rows: adapt {adapt:.3f} s, predict {predict:.3f} s "
        f"(adapt / predict {adapt / predict:.1f}); median of 5"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one draw, digits and IR 100 only")
    args = parser.parse_args()
    draws = 1 if args.quick else 3

    for seed in range(1 if args.quick else 4):
        data = load_long_tailed_digits(imbalance_ratio=10, random_state=seed)
        models = [
            Model(
                "BalancedSoftmax",
                BalancedSoftmaxClassifier(random_state=0),
                data.X_train,
                data.y_train,
            ),
            Model("PRL", PRLClassifier(random_state=0), data.X_train, data.y_train),
            Model(
                "LogisticRegression", LogisticRegression(max_iter=5000), data.X_train, data.y_train
            ),
        ]
        results = evaluate(models, data.X_test, data.y_test, draws, seed)
        summarise(f"Long-tailed digits (the quick start), IR 10, seed {seed}", results)

    if not args.quick:
        for label, weight_decay in (("default head", 1e-2), ("badly calibrated head", 1.0)):
            # 15,000 training rows; the test pool is large enough that every shifted
            # set holds well over 1,000 rows (the rarest class has about 1,500).
            X, y = make_long_tailed_embeddings(
                400000, 64, 20, imbalance_ratio=50, noise=2.0, random_state=0
            )
            X_train, X_pool, y_train, y_pool = train_test_split(
                X, y, train_size=15000, stratify=y, random_state=0
            )
            balanced = shifted_rows(y_pool, np.full(20, 1 / 20), np.random.default_rng(0))
            models = [
                Model(
                    f"BalancedSoftmax weight_decay={weight_decay:g}",
                    BalancedSoftmaxClassifier(random_state=0, weight_decay=weight_decay),
                    X_train,
                    y_train,
                )
            ]
            results = evaluate(models, X_pool[balanced], y_pool[balanced], draws, 0)
            summarise(f"Synthetic embeddings, 20 classes, IR 50, {label}", results)

    if FEATURES.exists():
        for ir in (100,) if args.quick else (100, 10):
            models, X_test, y_test = cifar(ir, sade=ir == 100 and not args.quick, draws=draws)
            results = evaluate(models, X_test, y_test, draws, 0)
            summarise(
                f"CIFAR-10-LT IR {ir} (EfficientNet-Lite0 embeddings, real test set)", results
            )
            if ir == 100:
                time_adapt(models[0], X_test)
                print(f"fit with calibration_cv=3: {models[0].fit_seconds:.2f} s")
    else:
        print(f"\n{FEATURES} is absent: CIFAR-10 rows skipped.")


if __name__ == "__main__":
    main()
