"""Toward the balanced ceiling: training views, test views, tail synthesis.

CIFAR-10-LT from the shared EfficientNet-Lite0 embeddings (../shared/README.md)
and, for the augmented views, the shared JPEG zips through the same backbone
(extracted on the first run into ``benchmarks/results/``, cached; the
extraction time per view is printed as a ratio to one LogisticRegression fit).

``--select`` makes every choice on validation, never on test: IR 100, seed 0,
the long-tailed subset drawn from the training images minus 500 per class,
which form a balanced validation set (as ``bench_methods.py --select-shike``).
It compares the augmentations (a horizontal flip; random crop with 4-pixel
padding and flip; random resized crop and flip), averaging probabilities or
logits over test views, and the tail-synthesis settings.

The main run, IR 100, 50 and 10, 5 seeds (the seed draws the long-tailed
training set and seeds the model): BalancedSoftmax as it is; + training views;
+ test views; + both (the best combination on validation); + tail synthesis;
views and synthesis combined; PRL plain and with views; the scikit-learn
baseline (LogisticRegression, ``C`` chosen on a validation split, post-hoc
logit adjustment) and, at the first IR, the balanced-training ceiling (the same
linear model on all 50,000 training images, plain and with views). Columns:
uniform-test accuracy (mean and spread over seeds), the three smallest classes'
accuracy, the mean over the 11 shifted test sets, fit time as a ratio to one LR
fit in the same run.

    python benchmarks/bench_accuracy.py [--select] [--ir 100 50 10] [--seeds 5]
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from bench_methods import AdjustedLogisticRegression, tune_C
from scipy.special import logsumexp

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.datasets import long_tailed_subset, shifted_test_subsets
from ltlearn.features import FeatureFile, extract, read_features
from ltlearn.features.sources import ImageFolderSource
from ltlearn.metrics import group_accuracy, rank_groups

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_FILE = SHARED / "cifar10_effnetlite0.h5"
RESULTS = ROOT / "benchmarks" / "results"
# Blocks whose pooled outputs join the embedding in the multi-depth rows (the
# layers chosen for SHIKE on validation in bench_methods.py).
LAYERS = ["model._blocks.14", "model._blocks.15"]
# The augmentation, chosen on validation (--select); tail synthesis lost accuracy
# there at every fraction tried, so the table shows one fraction for the record.
AUGMENTATION = "crop+flip"
TAIL_SYNTHESIS = 0.1


def augmentations():
    """The candidate view transforms: name -> (number of views, PIL transform)."""
    from torchvision import transforms

    flip = transforms.RandomHorizontalFlip()
    return {
        # One view: the mirror image (a second would repeat the first or the plain one).
        "flip": (1, transforms.RandomHorizontalFlip(p=1.0)),
        "crop+flip": (
            2,
            transforms.Compose(
                [transforms.RandomCrop(32, padding=4, padding_mode="reflect"), flip]
            ),
        ),
        "resized crop+flip": (
            2,
            transforms.Compose([transforms.RandomResizedCrop(32, scale=(0.35, 1.0)), flip]),
        ),
    }


def views_file(augmentation, tag):
    name = augmentation.replace(" ", "_").replace("+", "_")
    return RESULTS / f"cifar10_views_{name}_{tag}.h5"


def extract_views(augmentation, split, ids, tag, layers=None):
    """Views of the images ``ids`` of ``split`` under ``augmentation``, cached in a file per tag.

    Returns (plain rows of shape (len(ids), d) and views of shape (len(ids),
    n_views, d), in the order of ``ids``; seconds the extraction took, recorded
    beside the file when it ran). ``layers``: pooled outputs of these blocks
    precede the embedding in each row.
    """
    from ltlearn.features.backbones import efficientnet_lite0

    n_views, transform = augmentations()[augmentation]
    path = views_file(augmentation, tag)
    timing = path.with_suffix(".seconds.json")
    seconds = 0.0
    complete = False
    if path.exists():
        with FeatureFile(path) as f:
            complete = split in f.splits and set(ids) <= set(f.ids(split).tolist())
    if not complete:
        source = ImageFolderSource(SHARED / f"cifar10-{split}-jpg.zip", prefix=split)
        position = {key: i for i, key in enumerate(source.ids)}
        rows = np.array([position[key] for key in ids])
        # A subset of the zip: extract reads only ``ids`` and ``labels`` per item.
        source = copy.copy(source)
        source.ids = [source.ids[i] for i in rows]
        source.labels = source.labels[rows]
        RESULTS.mkdir(exist_ok=True)
        print(f"Extracting {n_views} {augmentation} view(s) of {len(rows)} {split} images ...")
        start = time.perf_counter()
        extract(
            source,
            efficientnet_lite0(),
            path,
            split=split,
            views=n_views,
            view_transform=transform,
            layers=layers,
            random_state=0,
        )
        seconds = time.perf_counter() - start
        times = json.loads(timing.read_text()) if timing.exists() else {}
        timing.write_text(json.dumps({**times, split: seconds}))
    if timing.exists():
        seconds = json.loads(timing.read_text()).get(split, 0.0)
    with FeatureFile(path) as f:
        position = {key: i for i, key in enumerate(f.ids(split))}
        X, views = f.read(split)[0], f.views(split)
    order = [position[key] for key in ids]
    return X[order], views[order], seconds


def selection_rows(y):
    """Validation protocol: (long-tailed training rows, balanced validation rows)."""
    rng = np.random.default_rng(0)
    held = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), 500, replace=False) for c in range(10)]
    )
    rest = np.setdiff1d(np.arange(len(y)), held)
    return rest[long_tailed_subset(y[rest], 100, random_state=0)], held


def evaluate(model, X_test, y_test, subsets, groups, views=None):
    kw = {} if views is None else {"views": views}
    pred = np.asarray(model.predict(X_test, **kw))
    return {
        "uniform": np.mean(pred == y_test),
        "tail": group_accuracy(y_test, pred, groups)["tail"],
        "11-set mean": np.mean([np.mean(pred[i] == y_test[i]) for i in subsets.values()]),
    }


def average_views(scores, how):
    """Average per-view scores (n_views, n_rows, n_classes): mean logits or mean probabilities."""
    if how == "logits":
        return scores.mean(axis=0)
    log_p = scores - logsumexp(scores, axis=2, keepdims=True)
    return logsumexp(log_p, axis=0) - np.log(len(scores))


def select(X, y, ids, seeds=3):
    """Validation runs: IR 100 seed 0 against a balanced held-out set; prints one table."""
    train, held = selection_rows(y)
    groups = rank_groups(np.bincount(y[train], minlength=10))
    rows = ids[np.concatenate([train, held])].tolist()
    views = {name: extract_views(name, "train", rows, "select")[1] for name in augmentations()}
    # Multi-depth rows and their views: read from the main run's file (all training images).
    D, views["depths"], _ = extract_views(AUGMENTATION, "train", ids.tolist(), "depths", LAYERS)
    D, views["depths"] = (
        D[np.concatenate([train, held])],
        views["depths"][np.concatenate([train, held])],
    )
    print("\n| setting | validation accuracy % | tail-3 accuracy % | fit s |")
    print("|---|---|---|---|")

    def run(label, params=None, train_views=None, test_views=None, how="logits", depths=False):
        X_fit, X_held = (D[: len(train)], D[len(train) :]) if depths else (X[train], X[held])
        accuracy, tail, seconds = [], [], []
        for seed in range(seeds):
            model = BalancedSoftmaxClassifier(random_state=seed, **(params or {}))
            start = time.perf_counter()
            V = None if train_views is None else views[train_views][: len(train)]
            model.fit(X_fit, y[train], views=V)
            seconds.append(time.perf_counter() - start)
            scores = [model.decision_function(X_held)]
            if test_views is not None:
                held_views = views[test_views][len(train) :]
                scores += [
                    model.decision_function(held_views[:, v]) for v in range(held_views.shape[1])
                ]
            pred = np.argmax(average_views(np.stack(scores), how), axis=1)
            accuracy.append(100 * np.mean(pred == y[held]))
            tail.append(100 * group_accuracy(y[held], pred, groups)["tail"])
        print(
            f"| {label} | {np.mean(accuracy):.2f} | {np.mean(tail):.1f} | {np.mean(seconds):.2f} |",
            flush=True,
        )

    run("BalancedSoftmax")
    for name in augmentations():
        run(f"+ training views: {name}", train_views=name)
        run(f"+ training views: {name}, 40 epochs", {"max_epochs": 40}, train_views=name)
    for name in augmentations():
        for how in ("logits", "probabilities"):
            run(f"+ test views: {name}, mean {how}", test_views=name, how=how)
            run(
                f"+ training and test views: {name}, mean {how}",
                train_views=name,
                test_views=name,
                how=how,
            )
    for fraction in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        run(f"+ tail synthesis {fraction}", {"tail_synthesis": fraction})
    layers = ", ".join(LAYERS)
    run(f"BalancedSoftmax on {layers} and the embedding", depths=True)
    run(
        f"BalancedSoftmax on {layers} and the embedding + training and test views: {AUGMENTATION}",
        train_views="depths",
        test_views="depths",
        depths=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--select", action="store_true", help="validation runs for the choices")
    parser.add_argument("--ir", type=float, nargs="+", default=[100, 50, 10])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    with FeatureFile(args.features) as f:
        ids, y = f.ids("train"), f.labels("train")
    BalancedSoftmaxClassifier(max_epochs=1).fit(np.eye(4), [0, 1, 0, 1])  # torch warm-up
    X_pool, _ = read_features(args.features, "train")
    if args.select:
        select(X_pool, y, ids)
        return
    X_test, y_test = read_features(args.features, "test")
    with FeatureFile(args.features) as f:
        test_ids = f.ids("test")
    draws = {
        (ir, seed): long_tailed_subset(y, ir, random_state=seed)
        for ir in args.ir
        for seed in range(args.seeds)
    }
    n_views, _ = augmentations()[AUGMENTATION]
    # Every training image: the balanced ceiling trains on all of them.
    _, V_pool, train_seconds = extract_views(AUGMENTATION, "train", ids.tolist(), "all")
    _, V_test, _ = extract_views(AUGMENTATION, "test", test_ids.tolist(), "all")
    # The same images and views with the outputs of two more blocks beside the embedding.
    D_pool, DV_pool, _ = extract_views(AUGMENTATION, "train", ids.tolist(), "depths", LAYERS)
    D_test, DV_test, _ = extract_views(AUGMENTATION, "test", test_ids.tolist(), "depths", LAYERS)
    seconds_per_view = None
    if train_seconds:
        # Per image and view, the plain view included (extract embeds it too).
        seconds_per_view = train_seconds / (len(y) * (n_views + 1))

    def bs(**params):
        return lambda s: BalancedSoftmaxClassifier(random_state=s, **params)

    both = {"views": True, "test_views": True}
    settings = {
        "BalancedSoftmax": {"make": bs()},
        "+ training views": {"views": True, "make": bs()},
        "+ test views": {"test_views": True, "make": bs()},
        "+ training and test views (best on validation)": {**both, "make": bs()},
        f"+ tail synthesis {TAIL_SYNTHESIS}": {"make": bs(tail_synthesis=TAIL_SYNTHESIS)},
        f"+ training and test views + tail synthesis {TAIL_SYNTHESIS}": {
            **both,
            "make": bs(tail_synthesis=TAIL_SYNTHESIS),
        },
        "PRL (uniform)": {"make": lambda s: PRLClassifier(random_state=s)},
        "PRL (uniform) + training and test views": {
            **both,
            "make": lambda s: PRLClassifier(random_state=s),
        },
        "BalancedSoftmax *": {"depths": True, "make": bs()},
        "BalancedSoftmax * + training and test views": {"depths": True, **both, "make": bs()},
        "PRL (uniform) * + training and test views": {
            "depths": True,
            **both,
            "make": lambda s: PRLClassifier(random_state=s),
        },
    }
    columns = ["uniform", "tail", "11-set mean", "fit / LR"]
    for ir in args.ir:
        C = tune_C(X_pool[draws[ir, 0]], y[draws[ir, 0]], seed=0)
        names = ["LogisticRegression, C tuned + post-hoc LA", *settings]
        ceilings = {
            "ceiling: BalancedSoftmax on all 50,000": {"make": bs()},
            "ceiling + training and test views": {**both, "make": bs()},
            "ceiling * + training and test views": {"depths": True, **both, "make": bs()},
        }
        names += list(ceilings)
        results = {name: [] for name in names}
        lr_times = []
        for seed in range(args.seeds):
            idx = draws[ir, seed]
            X, y_fit = X_pool[idx], y[idx]
            groups = rank_groups(np.bincount(y_fit))
            subsets = shifted_test_subsets(y_test, random_state=seed)
            start = time.perf_counter()
            lr = AdjustedLogisticRegression(C).fit(X, y_fit)
            lr_seconds = time.perf_counter() - start
            lr_times.append(lr_seconds)
            row = evaluate(lr, X_test, y_test, subsets, groups)
            results[names[0]].append({**row, "fit / LR": 1.0})
            runs = [(name, setting, idx) for name, setting in settings.items()]
            if ir == args.ir[0]:
                runs += [(name, setting, np.arange(len(y))) for name, setting in ceilings.items()]
            for name, setting, rows in runs:
                train_rows, train_views, test_rows, test_views = X_pool, V_pool, X_test, V_test
                if setting.get("depths"):
                    train_rows, train_views, test_rows, test_views = (
                        D_pool,
                        DV_pool,
                        D_test,
                        DV_test,
                    )
                start = time.perf_counter()
                views = train_views[rows] if setting.get("views") else None
                model = setting["make"](seed).fit(train_rows[rows], y[rows], views=views)
                seconds = time.perf_counter() - start
                test_views = test_views if setting.get("test_views") else None
                row = evaluate(model, test_rows, y_test, subsets, groups, test_views)
                results[name].append({**row, "fit / LR": seconds / lr_seconds})
            print(f"IR {ir:g}, seed {seed} done", flush=True)
        print(f"\n### IR {ir:g}: mean (std) over {args.seeds} seeds; LogisticRegression C={C:g}")
        print(
            f"\nViews: {AUGMENTATION}, {n_views} per image. Tail: the 3 smallest classes. "
            f"*: the outputs of {', '.join(LAYERS)} beside the embedding.\n"
        )
        print("| model | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name, rows in results.items():
            if not rows:
                continue
            cells = []
            for column in columns:
                values = np.array([r[column] for r in rows], dtype=float)
                scale = 1 if column == "fit / LR" else 100
                digits = 2 if column == "fit / LR" else 1
                cells.append(
                    f"{scale * values.mean():.{digits}f} ({scale * values.std():.{digits}f})"
                )
            print(f"| {name} | " + " | ".join(cells) + " |")
        if seconds_per_view is not None:
            ratio = seconds_per_view * len(draws[ir, 0]) / np.mean(lr_times)
            print(
                f"\nExtracting one view of this training set ({len(draws[ir, 0]):,} images) "
                f"costs {ratio:.2f} LR fits ({seconds_per_view * 1e3:.1f} ms per image and view)."
            )


if __name__ == "__main__":
    main()
