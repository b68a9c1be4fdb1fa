"""Test-agnostic prediction: label-shift estimation, PRL preferences and SADE's aggregation.

Protocol of ../shared/README.md (CIFAR-10-LT from real EfficientNet-Lite0
embeddings at IR 100, 50, 10; SADE's 11 test distributions drawn from the
balanced test set). For each IR, in the same run:

- BalancedSoftmaxClassifier unadapted, shifted by each test set's true prior
  (the oracle), and adapted with each label-shift method of
  ``ltlearn.adaptation`` (EM, EM after BCTS calibration, MAP, BBSE, RLLS);
- PRLClassifier at the uniform corner, at the best preference in hindsight
  (an oracle: the best of a 66-point simplex grid for each test set), and
  adapted with each method (the estimated prior mapped to a preference);
- SADEClassifier with equal weights, with its test-time aggregation over two
  augmented views of each test image, with the noise-view fallback, and with
  MAP (its fallback without views);
- the total variation distance of each estimated prior to the true one;
- all of it with the whole test set unlabeled, and with 1,000, 300 and 100
  unlabeled rows per test set (5 draws; estimated on the sample, applied to
  the whole set);
- the time of each adaptation step on 10,000 rows.

Held-out labeled rows (``validation``, for BBSE, RLLS and BCTS) are what a
user would carve from their labeled data: a stratified fifth of the
long-tailed training set. Methods that need them use models fitted on the other
four fifths, and their rows are compared with the unadapted and oracle rows of
those same models ("80 % fit"); every other model is fitted on the whole
long-tailed set.

The test views are embeddings of two augmented views (SADE's CIFAR
augmentation: random crop with 4-pixel padding, colour jitter, grayscale,
flip) of each test image, extracted once from ../shared/data/cifar10-test-jpg.zip
into benchmarks/results/ (about 4 minutes on 2 cores) and reused afterwards.

``--select`` prints the validation tables from which the defaults of MAP's
pseudo-counts and RLLS's regularization were chosen (cross-fitted logits of
the training set, shifts simulated on them; no test data).

    python benchmarks/bench_adaptation.py [--ir 100 50 10] [--draws 5] [--select]
"""

import argparse
import copy
import time
from pathlib import Path

import numpy as np
from scipy.special import log_softmax
from sklearn.model_selection import StratifiedKFold

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier, SADEClassifier
from ltlearn.adaptation import em_prior, estimate_test_prior, rlls_prior
from ltlearn.datasets import long_tailed_subset, shifted_test_subsets, train_val_split
from ltlearn.features import FeatureFile, read_features
from ltlearn.plotting import simplex_grid

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared/data"
DEFAULT_FILE = SHARED / "cifar10_effnetlite0.h5"
TEST_ZIP = SHARED / "cifar10-test-jpg.zip"
VIEWS_FILE = ROOT / "benchmarks/results/cifar10_test_views.h5"


def test_views(features_file, views_file, zip_file):
    """Two augmented views of each test image, in the row order of ``features_file``."""
    if not views_file.exists():
        from torchvision import transforms

        from ltlearn.features import extract
        from ltlearn.features.backbones import efficientnet_lite0
        from ltlearn.features.sources import ImageFolderSource

        augment = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                transforms.RandomHorizontalFlip(),
            ]
        )
        print(f"Extracting 2 augmented views of each test image into {views_file} ...", flush=True)
        views_file.parent.mkdir(parents=True, exist_ok=True)
        source = ImageFolderSource(zip_file, prefix="test")
        extract(
            source,
            efficientnet_lite0(),
            views_file,
            split="test",
            views=2,
            view_transform=augment,
            random_state=0,
        )
    with FeatureFile(views_file) as f:
        views, ids = f.views("test"), f.ids("test")
    with FeatureFile(features_file) as f:
        wanted = f.ids("test")
    position = {key: i for i, key in enumerate(ids)}
    return views[[position[key] for key in wanted]]


FIT_80 = "80 % fit: "


def pct(v):
    return f"{100 * v:.1f}"


class Column:
    """Accuracy and prior error of one method on one test set, over draws."""

    def __init__(self):
        self.acc, self.tv = [], []


def run_methods(methods, X_test, y_test, views, subsets, size, draws, seed):
    """``{method: {test set: Column}}`` for unlabeled samples of ``size`` rows (None: all)."""
    n_classes = int(y_test.max()) + 1
    table = {label: {name: Column() for name in subsets} for label in methods}
    for name, idx in subsets.items():
        truth = np.bincount(y_test[idx], minlength=n_classes) / len(idx)
        n_draws = 1 if size is None or size >= len(idx) else draws
        for draw in range(n_draws):
            rng = np.random.default_rng([seed, draw])
            rows = idx if n_draws == 1 else np.sort(rng.choice(idx, size, replace=False))
            for label, method in methods.items():
                pred, prior = method(rows, idx, truth, views)
                cell = table[label][name]
                cell.acc.append(np.mean(pred == y_test[idx]))
                if prior is not None:
                    cell.tv.append(0.5 * np.abs(prior - truth).sum())
    return table


def print_accuracy(ir, size, table, names, baseline):
    short = [n.replace("forward_", "F").replace("backward_", "B") for n in names]
    label = "whole test set" if size is None else f"{size} unlabeled rows per test set"
    print(f"\n### IR {ir:g}, {label}: accuracy (%)\n")
    print("| method | " + " | ".join(short) + " | mean | worst vs unadapted |")
    print("|---|" + "---|" * (len(names) + 2))
    for method, cells in table.items():
        # Rows of the 80 % models compare with the unadapted 80 % model.
        reference = f"{FIT_80}{baseline}" if method.startswith(FIT_80) else baseline
        base = np.array([np.mean(table[reference][n].acc) for n in names])
        acc = np.array([np.mean(cells[n].acc) for n in names])
        worst = np.min(acc - base)
        print(
            f"| {method} | "
            + " | ".join(pct(a) for a in acc)
            + f" | **{100 * acc.mean():.2f}** | {100 * worst:+.1f} |"
        )


def print_prior_error(ir, size, table, names):
    short = [n.replace("forward_", "F").replace("backward_", "B") for n in names]
    label = "whole test set" if size is None else f"{size} unlabeled rows"
    print(f"\n### IR {ir:g}, {label}: total variation distance of the estimated prior (x100)\n")
    print("| method | " + " | ".join(short) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    for method, cells in table.items():
        if not cells[names[0]].tv:
            continue
        tv = np.array([np.mean(cells[n].tv) for n in names])
        print(
            f"| {method} | "
            + " | ".join(f"{100 * t:.1f}" for t in tv)
            + f" | {100 * tv.mean():.1f} |"
        )


def make_methods(models, X_test, y_test, validation, grid_scores):
    """Each method maps (unlabeled rows, scored rows, true prior, views) to (predictions, prior)."""
    bs, prl, sade, bs80, prl80 = models
    n_classes = len(bs.classes_)
    bs_scores = bs.decision_function(X_test)
    bs80_scores = bs80.decision_function(X_test)

    def adapted(estimator, **options):
        def run(rows, idx, truth, views):
            model = copy.copy(estimator).adapt(X_test[rows], **options)
            return model.predict(X_test[idx]), model.test_prior_

        return run

    def oracle(scores):
        def run(rows, idx, truth, views):
            with np.errstate(divide="ignore"):
                return np.argmax(scores[idx] + np.log(truth), axis=1), truth

        return run

    def prl_hindsight(rows, idx, truth, views):
        accuracy = (grid_scores[:, idx].argmax(axis=2) == y_test[idx]).mean(axis=1)
        return grid_scores[int(np.argmax(accuracy)), idx].argmax(axis=1), None

    def sade_aggregation(use_views):
        def run(rows, idx, truth, views):
            model = copy.copy(sade)
            if use_views:
                model.adapt(X_test[rows], views=views[rows], method="aggregation")
            else:
                model.adapt(X_test[rows], method="aggregation")
            return model.predict(X_test[idx]), None

        return run

    def sade_map(rows, idx, truth, views):
        model = copy.copy(sade).adapt(X_test[rows])
        return model.predict(X_test[idx]), model.test_prior_

    uniform = np.full(n_classes, 1.0 / n_classes)
    return {
        "BalancedSoftmax, unadapted": lambda r, i, t, v: (bs_scores[i].argmax(1), uniform),
        "BalancedSoftmax + true test prior (oracle)": oracle(bs_scores),
        "BalancedSoftmax + EM": adapted(bs, method="em"),
        "BalancedSoftmax + MAP (default adapt)": adapted(bs, method="map"),
        "BalancedSoftmax + MAP, adapting whatever the test says": adapted(
            bs, method="map", significance=None
        ),
        "PRL, uniform preference": lambda r, i, t, v: (prl.predict(X_test[i]), None),
        "PRL, best preference in hindsight (oracle)": prl_hindsight,
        "PRL + EM": adapted(prl, method="em"),
        "PRL + MAP": adapted(prl, method="map"),
        "SADE, equal weights": lambda r, i, t, v: (sade.predict(X_test[i]), None),
        "SADE + aggregation on 2 augmented views": sade_aggregation(True),
        "SADE + aggregation on noise views (fallback)": sade_aggregation(False),
        "SADE + MAP (fallback without views)": sade_map,
        FIT_80 + "BalancedSoftmax, unadapted": lambda r, i, t, v: (
            bs80_scores[i].argmax(1),
            uniform,
        ),
        "80 % fit: BalancedSoftmax + true test prior (oracle)": oracle(bs80_scores),
        "80 % fit: BalancedSoftmax + MAP": adapted(bs80, method="map"),
        "80 % fit: BalancedSoftmax + EM after BCTS": adapted(
            bs80, method="em", validation=validation
        ),
        "80 % fit: BalancedSoftmax + MAP after BCTS": adapted(
            bs80, method="map", validation=validation
        ),
        "80 % fit: BalancedSoftmax + BBSE": adapted(bs80, method="bbse", validation=validation),
        "80 % fit: BalancedSoftmax + RLLS": adapted(bs80, method="rlls", validation=validation),
        "80 % fit: PRL + BBSE": adapted(prl80, method="bbse", validation=validation),
        "80 % fit: PRL + RLLS": adapted(prl80, method="rlls", validation=validation),
    }


def adaptation_times(models, X, views, validation, repeats=3):
    bs, prl, sade, bs80, _ = models
    rows = X[:10_000]
    steps = {
        "BalancedSoftmax MAP": lambda: copy.copy(bs).adapt(rows),
        "BalancedSoftmax EM": lambda: copy.copy(bs).adapt(rows, method="em"),
        "BalancedSoftmax EM after BCTS": lambda: copy.copy(bs80).adapt(
            rows, method="em", validation=validation
        ),
        "BalancedSoftmax BBSE": lambda: copy.copy(bs80).adapt(
            rows, method="bbse", validation=validation
        ),
        "BalancedSoftmax RLLS": lambda: copy.copy(bs80).adapt(
            rows, method="rlls", validation=validation
        ),
        "PRL MAP (prior + preference)": lambda: copy.copy(prl).adapt(rows),
        "SADE aggregation, 2 views": lambda: copy.copy(sade).adapt(
            rows, views=views[:10_000], method="aggregation"
        ),
        "BalancedSoftmax predict (for scale)": lambda: bs.predict(rows),
    }
    print(
        f"\n### Time of one adaptation step on {len(rows):,} unlabeled rows (best of {repeats})\n"
    )
    print("| step | seconds |")
    print("|---|---|")
    for label, step in steps.items():
        step()
        best = min(_seconds(step) for _ in range(repeats))
        print(f"| {label} | {best:.3f} |")


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def select_defaults(X, y, seed, sizes=(100, 300, 1000), draws=10):
    """The validation experiment behind the MAP and RLLS defaults (no test data).

    Cross-fitted logits of the long-tailed training set stand in for a test
    set: SADE's 11 class priors are simulated by drawing rows class by class
    from four fifths of them; RLLS's confusion matrix comes from the last fifth.
    """
    n_classes = int(y.max()) + 1
    logits = np.zeros((len(y), n_classes))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed).split(X, y)
    for k, (fit_rows, held_out) in enumerate(folds):
        model = BalancedSoftmaxClassifier(random_state=k).fit(X[fit_rows], y[fit_rows])
        logits[held_out] = model.decision_function(X[held_out])
    proba = np.exp(log_softmax(logits, axis=1))
    pred = logits.argmax(axis=1)
    pool, val = train_val_split(y, val_size=0.2, random_state=seed)
    uniform = np.full(n_classes, 1.0 / n_classes)
    members = [pool[y[pool] == c] for c in range(n_classes)]

    def profile(ratio, backward):
        q = ratio ** (-np.arange(n_classes) / (n_classes - 1))
        return (q[::-1] if backward else q) / q.sum()

    targets = [profile(r, False) for r in (50, 25, 10, 5, 2)] + [uniform]
    targets += [profile(r, True) for r in (2, 5, 10, 25, 50)]

    def accuracy(prior, q):
        decided = np.argmax(logits + np.log(np.maximum(prior, 1e-12)), axis=1)
        return sum(q[c] * np.mean(decided[members[c]] == c) for c in range(n_classes))

    estimators = {f"MAP, pseudo-counts {a:g}": a for a in (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)}
    estimators.update({f"RLLS, regularization {r:g}": -r for r in (0.0, 0.01, 0.03, 0.1, 1.0)})
    base = np.array([accuracy(uniform, q) for q in targets])
    print("| rows | estimator | 11-set mean | worst set vs unadapted |")
    print("|---|---|---|---|")
    for size in sizes:
        for label, setting in estimators.items():
            acc = np.zeros(len(targets))
            for t, q in enumerate(targets):
                for d in range(draws):
                    rng = np.random.default_rng([seed, d])
                    rows = [rng.choice(members[c]) for c in rng.choice(n_classes, size, p=q)]
                    if label.startswith("MAP"):
                        prior = em_prior(proba[rows], uniform, pseudo_counts=setting)
                    else:
                        prior = rlls_prior(
                            y[val], pred[val], pred[rows], n_classes, regularization=-setting
                        )
                    acc[t] += accuracy(prior, q) / draws
            print(
                f"| {size} | {label} | {100 * acc.mean():.2f} | {100 * np.min(acc - base):+.2f} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--views", type=Path, default=VIEWS_FILE)
    parser.add_argument("--zip", type=Path, default=TEST_ZIP)
    parser.add_argument("--ir", type=float, nargs="+", default=[100, 50, 10])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 300, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--select", action="store_true", help="print the validation of defaults")
    args = parser.parse_args()
    if not args.features.exists():
        raise SystemExit(f"Feature file {args.features} not found; pass --features FILE.")

    X_pool, y_pool = read_features(args.features, "train")
    X_test, y_test = read_features(args.features, "test")
    views = test_views(args.features, args.views, args.zip)
    subsets = shifted_test_subsets(y_test, random_state=args.seed)
    names = list(subsets)
    grid = simplex_grid(10)
    for ir in args.ir:
        idx = long_tailed_subset(y_pool, ir, random_state=args.seed)
        X, y = X_pool[idx], y_pool[idx]
        fit_rows, held = train_val_split(y, val_size=0.2, random_state=args.seed)
        validation = (X[held], y[held])
        print(f"\n## IR {ir:g}: {len(y)} training rows ({len(held)} held out for validation)")
        if args.select:
            print("\n### Validation: MAP pseudo-counts and RLLS regularization (no test data)\n")
            select_defaults(X, y, args.seed)
        models = (
            BalancedSoftmaxClassifier(random_state=args.seed).fit(X, y),
            PRLClassifier(random_state=args.seed).fit(X, y),
            SADEClassifier(random_state=args.seed).fit(X, y),
            BalancedSoftmaxClassifier(random_state=args.seed).fit(X[fit_rows], y[fit_rows]),
            PRLClassifier(random_state=args.seed).fit(X[fit_rows], y[fit_rows]),
        )
        grid_scores = models[1].decision_function_many(X_test, grid)
        methods = make_methods(models, X_test, y_test, validation, grid_scores)
        for size in [None, *args.sizes]:
            table = run_methods(
                methods, X_test, y_test, views, subsets, size, args.draws, args.seed
            )
            print_accuracy(ir, size, table, names, "BalancedSoftmax, unadapted")
            print_prior_error(ir, size, table, names)
        adaptation_times(models, X_test, views, validation)
        # estimate_test_prior also serves scikit-learn classifiers: one line to show it.
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=0.01, max_iter=1000).fit(X, y)
        forward = subsets[names[0]]
        q = estimate_test_prior(lr, X_test[forward], source_prior=np.bincount(y) / len(y))
        truth = np.bincount(y_test[forward], minlength=10) / len(forward)
        print(
            f"\nLogisticRegression(C=0.01) + MAP on {names[0]}: total variation "
            f"{100 * 0.5 * np.abs(q - truth).sum():.1f} (x100)"
        )


if __name__ == "__main__":
    main()
