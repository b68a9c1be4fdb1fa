"""A trainable top stage against the frozen embedding, on CIFAR-10-LT from the shared JPEGs.

Extracts EfficientNet-Lite0's activations at a cut (``model._blocks.14`` by default) for
the long-tailed training images and the test images, once (cached under
``benchmarks/results/``), then fits in the same run:

- ``LogisticRegression(C=0.003)`` on the frozen embedding (the time reference: fit
  times are ratios to it) with post-hoc logit adjustment;
- ``BalancedSoftmaxClassifier()`` on the frozen embedding (``../shared``'s file);
- ``BalancedSoftmaxClassifier(head=TopStage())`` on the activations;
- ``SADEClassifier(head=TopStage(experts=...))`` on the activations (``--sade``);
- ``RIDEClassifier(head=TopStage(experts=...))`` on the activations (``--ride``).

It prints uniform accuracy, head / middle / tail accuracy (3 / 4 / 3 classes by training
size), ECE, the 11-set test-agnostic mean with ``adapt()``, fit time; then the extraction
rate against the bare forward pass of the same exported graph, and the cache size.
Every choice inside a fit (the epoch kept) is made on held-out training rows.

Run: ``python benchmarks/bench_capacity.py [--imbalance-ratios 100] [--seeds 0] [--sade]``
(``--help`` lists the variants).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ltlearn import BalancedSoftmaxClassifier, RIDEClassifier, SADEClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.features import FeatureFile, extract
from ltlearn.features.sources import ImageFolderSource
from ltlearn.metrics import (
    evaluate_test_agnostic,
    expected_calibration_error,
    group_accuracy,
    rank_groups,
)
from ltlearn.top_stage import TopStage

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


class Rows(torch.utils.data.Dataset):
    """Some rows of an image source, with its classes and ids."""

    def __init__(self, source, rows):
        self.source, self.rows = source, rows
        self.classes, self.ids = source.classes, [source.ids[i] for i in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.source[self.rows[i]]


def extract_cut(cut, train_rows, path):
    """The cut's activations of the chosen training rows and of the test set; seconds per split."""
    train = ImageFolderSource(SHARED / "cifar10-train-jpg.zip")
    test = ImageFolderSource(SHARED / "cifar10-test-jpg.zip")
    seconds = {}
    for split, source in (("train", Rows(train, train_rows)), ("test", test)):
        start = time.perf_counter()
        extract(source, "efficientnet-lite0", path, split=split, cut=cut, verbose=False)
        seconds[split] = (time.perf_counter() - start, len(source))
    return seconds


def bare_forward_rate(path, batch_size=64, repeats=5):
    """Images per second of the cached ONNX export (uint8 32x32 in, activations out)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        str(path.with_name(path.name + ".onnx").with_suffix(".32x32.onnx")),
        options,
        providers=["CPUExecutionProvider"],
    )
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, 32, 32), dtype=np.uint8)
    session.run(None, {"images": batch})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"images": batch})
    return batch_size * repeats / (time.perf_counter() - start)


def embeddings_by_id(ids, split):
    with FeatureFile(SHARED / "cifar10_effnetlite0.h5") as f:
        X, y = f.read(split)
        where = {i: k for k, i in enumerate(f.ids(split))}
    rows = np.array([where[i] for i in ids])
    return X[rows], y[rows]


def evaluate(name, model, X_test, y_test, fit_seconds, lr_seconds, adapt=True):
    proba = model.predict_proba(X_test)
    y_pred = model.classes_[proba.argmax(1)]
    groups = group_accuracy(y_test, y_pred, rank_groups(model.class_counts_, n_head=3, n_tail=3))
    shifted = evaluate_test_agnostic(
        model, X_test, y_test, adapt={} if adapt else None, random_state=0
    )
    return {
        "model": name,
        "uniform": 100 * groups["overall"],
        "head": 100 * groups["head"],
        "middle": 100 * groups["middle"],
        "tail": 100 * groups["tail"],
        "ECE": 100 * expected_calibration_error(y_test, proba),
        "11-set mean": 100 * float(np.mean(list(shifted.values()))),
        "fit time / LR": fit_seconds / lr_seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imbalance-ratios", type=float, nargs="+", default=[100.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cut", default="model._blocks.14")
    parser.add_argument("--sade", action="store_true", help="also fit SADE with per-expert tops")
    parser.add_argument("--ride", action="store_true", help="also fit RIDE with per-expert tops")
    parser.add_argument("--experts", default="head", choices=["all", "head"])
    parser.add_argument(
        "--expert-head", default="cosine", choices=["linear", "cosine"], help="SADE's experts"
    )
    parser.add_argument(
        "--train",
        nargs="*",
        default=["all", "last"],
        choices=["all", "last"],
        help="TopStage(train=...) variants of BalancedSoftmax",
    )
    parser.add_argument(
        "--skip-frozen", action="store_true", help="only the models with a trainable top"
    )
    args = parser.parse_args()
    if not (SHARED / "cifar10-train-jpg.zip").exists():
        sys.exit(f"needs the shared CIFAR-10 JPEGs in {SHARED}")
    RESULTS.mkdir(exist_ok=True)
    train_labels = np.array(ImageFolderSource(SHARED / "cifar10-train-jpg.zip").labels)
    rows_out = []
    for ratio in args.imbalance_ratios:
        for seed in args.seeds:
            keep = np.sort(long_tailed_subset(train_labels, ratio, random_state=seed))
            path = RESULTS / f"capacity_{args.cut.replace('.', '_')}_ir{ratio:g}_s{seed}.h5"
            seconds = extract_cut(args.cut, keep, path)
            with FeatureFile(path) as f:
                A_train, y_train = f.read("train")
                A_test, y_test = f.read("test")
                train_ids, test_ids = f.ids("train"), f.ids("test")
            E_train, _ = embeddings_by_id(train_ids, "train")
            E_test, _ = embeddings_by_id(test_ids, "test")

            start = time.perf_counter()
            LogisticRegression(C=0.003, max_iter=1000).fit(E_train, y_train)
            lr_seconds = time.perf_counter() - start
            print(f"IR {ratio:g} seed {seed}: LR(C=0.003) fit {lr_seconds:.1f} s", flush=True)
            models = []
            if not args.skip_frozen:
                models.append(
                    (
                        "BalancedSoftmax, frozen embedding",
                        BalancedSoftmaxClassifier,
                        {},
                        E_train,
                        E_test,
                    )
                )
            for train in args.train:
                models.append(
                    (
                        f"BalancedSoftmax, TopStage(train={train!r})",
                        BalancedSoftmaxClassifier,
                        {"head": TopStage(cut=args.cut, train=train)},
                        A_train,
                        A_test,
                    )
                )
            if args.sade:
                models.append(
                    (
                        f"SADE {args.expert_head}, TopStage(experts={args.experts!r})",
                        SADEClassifier,
                        {
                            "head": TopStage(cut=args.cut, experts=args.experts),
                            "expert_head": args.expert_head,
                        },
                        A_train,
                        A_test,
                    )
                )
            if args.ride:
                models.append(
                    (
                        f"RIDE, TopStage(experts={args.experts!r})",
                        RIDEClassifier,
                        {"head": TopStage(cut=args.cut, experts=args.experts)},
                        A_train,
                        A_test,
                    )
                )
            for name, cls, params, X_fit, X_eval in models:
                start = time.perf_counter()
                model = cls(random_state=seed, **params).fit(X_fit, y_train)
                fit_seconds = time.perf_counter() - start
                row = evaluate(name, model, X_eval, y_test, fit_seconds, lr_seconds)
                row.update(
                    ir=ratio,
                    seed=seed,
                    fit_s=fit_seconds,
                    best_epoch=getattr(model, "best_epoch_", None),
                )
                rows_out.append(row)
                print(row, flush=True)
                if cls is RIDEClassifier:
                    print(
                        "  experts used per test row:",
                        float(model.n_experts_used(X_eval).mean()),
                        "(3 at router_threshold=0:",
                        f"{model.set_params(router_threshold=0).score(X_eval, y_test):.4f})",
                    )
                    model.set_params(router_threshold=0.5)
                if cls is SADEClassifier:
                    tops = model.module_.head.tops
                    first = [next(t.parameters()).detach() for t in tops]
                    print(
                        "  largest difference between experts' first top weights:",
                        max(float((first[0] - w).abs().max()) for w in first[1:]),
                    )
                    uniform = model.score(X_eval, y_test)
                    model.adapt(X_eval, method="aggregation")
                    print(
                        f"  aggregation on the uniform test set: equal weights {uniform:.4f}, "
                        f"learnt {model.aggregation_weights_.round(3).tolist()} "
                        f"{model.score(X_eval, y_test):.4f}"
                    )
            rate = bare_forward_rate(path)
            for split, (sec, n) in seconds.items():
                print(
                    f"  extraction {split}: {n} images in {sec:.0f} s ({n / sec:.0f} img/s; "
                    f"bare forward of the cut graph {rate:.0f} img/s, ratio {n / sec / rate:.2f})"
                    " [0 s: cached]"
                )
            print(
                f"  cache: {os.path.getsize(path) / 2**20:.0f} MiB for "
                f"{len(A_train) + len(A_test)} images, rows {A_train.shape[1:]}"
            )
    keys = [
        "ir",
        "seed",
        "model",
        "uniform",
        "head",
        "middle",
        "tail",
        "ECE",
        "11-set mean",
        "fit time / LR",
        "fit_s",
        "best_epoch",
    ]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows_out:
        print(
            "| "
            + " | ".join(
                f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys
            )
            + " |"
        )


if __name__ == "__main__":
    main()
