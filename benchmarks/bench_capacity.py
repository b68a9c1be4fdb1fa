"""A trainable top stage against the frozen embedding, on CIFAR-10-LT from the shared JPEGs.

Extracts EfficientNet-Lite0's activations at a cut (``model._blocks.14`` by default) for
the long-tailed training images and the test images, once (cached under
``benchmarks/results/``), then fits in the same run:

- ``LogisticRegression(C=0.003)`` on the frozen embedding (the time reference: fit
  times are ratios to it) with post-hoc logit adjustment;
- ``BalancedSoftmaxClassifier()`` on the frozen embedding (``../shared``'s file);
- ``BalancedSoftmaxClassifier(head=TopStage())`` on the activations;
- ``SADEClassifier(head=TopStage(experts=...))`` on the activations (``--sade``; with
  ``--views``, trained on them too);
- ``RIDEClassifier(head=TopStage(experts=...))`` on the activations (``--ride``; with
  ``--views``, its tops trained on them, its router on the plain rows);
- ``PRLClassifier(head=TopStage())`` on the activations (``--prl``): one top shared by
  the preferences, the hypernetwork generating the head over it and scaling and shifting
  the top's last channels (``--prl shared``: without that modulation, ``modulate_top=False``;
  ``--prl both``: one of each; with ``--views``, trained on them too),

the multi-expert models with each TopStage variant's settings (``--train`` or ``--variants``).

It prints uniform accuracy, head / middle / tail accuracy (3 / 4 / 3 classes by training
size), ECE, the 11-set test-agnostic mean with ``adapt()``, fit time; then the extraction
rate against the bare forward pass of the same exported graph, and the cache size.
Every choice inside a fit (the epoch kept) is made on held-out training rows.

``--validation-pool`` never reads the test set: it is the protocol on which TopStage's
settings are chosen. It fits on the long-tailed training rows and scores a balanced pool of
500 training images per class drawn outside them (a class with fewer outside, the head
class at IR 100, gives its 500 from its own rows, which then leave the fit), after the
probe and after every fine-tuning epoch of each TopStage variant (``--variants``, JSON),
and SADE's 11 shifted sets drawn from the pool with ``adapt()``; ``--sade``, ``--ride``
and ``--prl`` add those models with each variant's top settings, every expert its own top
(PRL: one top shared by its preferences).
With ``--views K`` (either protocol) BalancedSoftmax's fine-tuning also draws from K augmented
views of each training image (reflect-padded random crops and mirrors), extracted at the same
cut and cached beside; ``--variants`` sets the TopStage models of the test protocol too.

Run: ``python benchmarks/bench_capacity.py [--imbalance-ratios 100] [--seeds 0] [--sade]``
(``--help`` lists the variants).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ltlearn import (
    BalancedSoftmaxClassifier,
    PRLClassifier,
    RIDEClassifier,
    SADEClassifier,
    _training,
)
from ltlearn.datasets import long_tailed_subset
from ltlearn.features import FeatureFile, extract
from ltlearn.features.recipes import PadCropFlip
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


def mirrored(X):
    """Each map's mirror image as its one test-time view, ``(n, 1, C, H, W)``."""
    return np.ascontiguousarray(X[:, None, ..., ::-1])


def evaluate(name, model, X_test, y_test, fit_seconds, lr_seconds, adapt=True):
    proba = model.predict_proba(X_test)
    y_pred = model.classes_[proba.argmax(1)]
    groups = group_accuracy(y_test, y_pred, rank_groups(model.class_counts_, n_head=3, n_tail=3))
    shifted = evaluate_test_agnostic(
        model, X_test, y_test, adapt={} if adapt else None, random_state=0
    )
    maps = np.ndim(X_test) == 4
    return {
        "model": name,
        "uniform": 100 * groups["overall"],
        "uniform, mirror view": (
            100 * np.mean(model.predict(X_test, views=mirrored(X_test)) == y_test) if maps else None
        ),
        "head": 100 * groups["head"],
        "middle": 100 * groups["middle"],
        "tail": 100 * groups["tail"],
        "ECE": 100 * expected_calibration_error(y_test, proba),
        "11-set mean": 100 * float(np.mean(list(shifted.values()))),
        "fit time / LR": fit_seconds / lr_seconds,
    }


POOL_PER_CLASS = 500
DEFAULT_VARIANTS = (
    '[{}, {"epochs": 3}, {"epochs": 8, "lr": 1e-3}, {"train": "all", "lr": 5e-4}, '
    '{"validation_fraction": 0}, {"mixup": 0.2}]'
)


def pool_rows(labels, keep, seed):
    """Balanced validation rows: outside ``keep``, or rows of ``keep`` that leave the fit."""
    rng = np.random.default_rng([seed, 123])
    outside = np.setdiff1d(np.arange(len(labels)), keep)
    pool, taken = [], []
    for c in np.unique(labels):
        others = outside[labels[outside] == c]
        if len(others) >= POOL_PER_CLASS:
            pool.append(rng.choice(others, POOL_PER_CLASS, replace=False))
        else:
            taken.append(rng.choice(keep[labels[keep] == c], POOL_PER_CLASS, replace=False))
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(taken or [np.empty(0, int)]))


class PoolScores:
    """Scores the fine-tuned module on the pool each time TopStage's fit validates it.

    Wraps the training core's ``fit_module`` for the duration of one fit: the validation
    callable TopStage passes is wrapped so that each epoch's module also predicts the
    pool's activations (passed through the frozen part of the top, as the fit's are).
    """

    def __init__(self, pool_inputs, y_pool):
        self.pool_inputs, self.y_pool, self.curve = pool_inputs, y_pool, []

    def __enter__(self):
        self.original = _training.fit_module

        def fit_module(module, *args, validation=None, **kwargs):
            if validation is not None:
                inner = validation

                def validation(trained):
                    held = 1.0 - inner(trained)
                    device = next(trained.parameters()).device
                    with torch.no_grad():
                        logits = torch.cat(
                            [trained(x.to(device)).cpu() for x in self.pool_inputs.split(256)]
                        )
                    pool = float((logits.argmax(1).numpy() == self.y_pool).mean())
                    self.curve.append((held, pool))
                    return 1.0 - held

            return self.original(module, *args, validation=validation, **kwargs)

        _training.fit_module = fit_module
        return self

    def __exit__(self, *exc):
        _training.fit_module = self.original


def train_views(args, keep, ids, stem, seed):
    """Activations of ``args.views`` augmented views of the rows ``keep``, cached beside theirs.

    Drawn by ``PadCropFlip``, as the recipe "layers-views" draws them, seeded by
    ``seed``, and cut alike.
    """
    path = RESULTS / f"{stem}_views{args.views}.h5"
    start = time.perf_counter()
    extract(
        Rows(ImageFolderSource(SHARED / "cifar10-train-jpg.zip"), keep),
        "efficientnet-lite0",
        path,
        split="train",
        cut=args.cut,
        views=args.views,
        view_transform=PadCropFlip(),
        random_state=seed,
        verbose=False,
    )
    with FeatureFile(path) as f:
        V, view_ids = f.views("train"), np.asarray(f.ids("train"))
    print(f"views: {time.perf_counter() - start:.0f} s (0 when cached)", flush=True)
    if not np.array_equal(view_ids, np.asarray(ids)):
        sys.exit(f"{path} lists other rows than the activations; remove it to extract again")
    return V


def validation_pool(args, train_labels, ratio, seed):
    """TopStage variants scored epoch by epoch on a balanced pool of training images."""
    keep = np.sort(long_tailed_subset(train_labels, ratio, random_state=seed))
    pool, leave = pool_rows(train_labels, keep, seed)
    stem = f"capacity_{args.cut.replace('.', '_')}_ir{ratio:g}_s{seed}"
    extract_cut(args.cut, keep, RESULTS / f"{stem}.h5")
    pool_path = RESULTS / f"{stem}_pool.h5"
    source = ImageFolderSource(SHARED / "cifar10-train-jpg.zip")
    extract(
        Rows(source, pool),
        "efficientnet-lite0",
        pool_path,
        split="pool",
        cut=args.cut,
        verbose=False,
    )
    with FeatureFile(RESULTS / f"{stem}.h5") as f:
        A, y = f.read("train")
        ids = np.asarray(f.ids("train"))
    V = train_views(args, keep, ids, stem, seed) if args.views else None
    with FeatureFile(pool_path) as f:
        P, y_pool = f.read("pool")
        pool_ids = np.asarray(f.ids("pool"))
    fit = ~np.isin(ids, np.asarray(source.ids)[leave])
    P = np.concatenate([P, A[~fit]])
    y_pool = np.concatenate([y_pool, y[~fit]])
    pool_ids = np.concatenate([pool_ids, ids[~fit]])
    A, y, ids = A[fit], y[fit], ids[fit]
    V = None if V is None else V[fit]
    E, _ = embeddings_by_id(ids, "train")
    E_pool, _ = embeddings_by_id(pool_ids, "train")
    frozen = BalancedSoftmaxClassifier(random_state=seed).fit(E, y)
    rows = [
        (
            "BalancedSoftmax, frozen embedding",
            "-",
            100 * frozen.score(E_pool, y_pool),
            pool_shifted_mean(frozen, E_pool, y_pool),
            "-",
            "-",
        )
    ]
    print(f"IR {ratio:g} seed {seed}: fit on {len(y)} rows, pool {len(y_pool)} rows", flush=True)
    print(rows[0], flush=True)
    P_t = torch.as_tensor(np.asarray(P, dtype=np.float32))
    views = f", {args.views} views" if args.views else ""
    for variant in json.loads(args.variants or DEFAULT_VARIANTS):
        settings = ", ".join(f"{k}={v!r}" for k, v in variant.items())
        if not args.skip_single:
            stage = TopStage(cut=args.cut, **variant)
            shared = stage.build(A.shape[1:])[0] if stage.train == "last" else torch.nn.Identity()
            with torch.no_grad():
                inputs = torch.cat([shared(x) for x in P_t.split(256)])
            start = time.perf_counter()
            with PoolScores(inputs, y_pool) as scores:
                model = BalancedSoftmaxClassifier(head=stage, random_state=seed).fit(A, y, views=V)
            seconds = time.perf_counter() - start
            curve = " / ".join(f"{100 * pool:.2f}" for _, pool in scores.curve) or "-"
            row = (
                f"TopStage({settings}){views}",
                curve,
                100 * model.score(P, y_pool),
                pool_shifted_mean(model, P, y_pool),
                model.best_epoch_,
                f"{seconds:.0f}",
            )
            rows.append(row)
            mirror = 100 * np.mean(model.predict(P, views=mirrored(P)) == y_pool)
            print(f"  kept, each pool map averaged with its mirror image: {mirror:.2f}", flush=True)
            print(f"  without the recalibration: {uncorrected_score(model, P, y_pool):.2f}")
            held = [round(100 * h, 2) for h, _ in scores.curve]
            print(row, f"held-out balanced: {held}", flush=True)
        # The multi-expert models with the same top settings, each expert its own top.
        multi = []
        if args.sade:
            multi.append(("SADE", SADEClassifier, {"expert_head": args.expert_head}, V))
        if args.ride:
            multi.append(("RIDE", RIDEClassifier, {}, V))
        for modulate in prl_modulations(args):
            multi.append((prl_label(modulate), PRLClassifier, {"modulate_top": modulate}, V))
        for label, cls, params, fit_views in multi:
            stage = TopStage(cut=args.cut, experts=args.experts, **variant)
            start = time.perf_counter()
            model = cls(head=stage, random_state=seed, **params).fit(A, y, views=fit_views)
            seconds = time.perf_counter() - start
            row = (
                f"{label}, TopStage({settings}"
                + (")" if cls is PRLClassifier else f", experts={args.experts!r})")
                + ("" if fit_views is None else views),
                "-",
                100 * model.score(P, y_pool),
                pool_shifted_mean(model, P, y_pool),
                model.best_epoch_,
                f"{seconds:.0f}",
            )
            rows.append(row)
            print(row, flush=True)
            if model._recalibrates_top and stage.recalibrate:
                print(f"  without the recalibration: {uncorrected_score(model, P, y_pool):.2f}")
            if cls is SADEClassifier:
                # Each expert's logits alone (forward, uniform, backward): is the gain
                # the uniform expert's own, or their combination's?
                logits = model._logits(model._validate(P))
                alone = [100 * np.mean(model.classes_[z.argmax(1)] == y_pool) for z in logits]
                print("  experts alone on the pool:", [round(a, 2) for a in alone], flush=True)
    print(
        "\n| seed | model | pool accuracy, probe / epoch 1 / ... | kept | 11-set mean on the "
        "pool, adapt() | epoch kept | fit s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, curve, kept, shifted, epoch, seconds in rows:
        print(f"| {seed} | {name} | {curve} | {kept:.2f} | {shifted:.2f} | {epoch} | {seconds} |")


def uncorrected_score(model, X, y):
    """Accuracy of the same fit without TopStage's recalibration (``recalibrate=True``)."""
    top = model.module_.head
    corrected = top.head
    # BalancedSoftmax's correction wraps its head as .head, PRL's its network as .network.
    top.head = getattr(corrected, "network", getattr(corrected, "head", corrected))
    try:
        return 100 * model.score(X, y)
    finally:
        top.head = corrected


def pool_shifted_mean(model, X_pool, y_pool):
    """SADE's 11 shifted sets drawn from the balanced pool: mean accuracy with ``adapt()``."""
    shifted = evaluate_test_agnostic(model, X_pool, y_pool, adapt={}, random_state=0)
    return 100 * float(np.mean(list(shifted.values())))


def prl_modulations(args):
    """The ``modulate_top`` values of the PRL models ``--prl`` asks for."""
    return {None: [], "modulated": [True], "shared": [False], "both": [False, True]}[args.prl]


def prl_label(modulate):
    return "PRL, one top" + (" modulated by the preference" if modulate else " shared")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imbalance-ratios", type=float, nargs="+", default=[100.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cut", default="model._blocks.14")
    parser.add_argument("--sade", action="store_true", help="also fit SADE with per-expert tops")
    parser.add_argument("--ride", action="store_true", help="also fit RIDE with per-expert tops")
    parser.add_argument(
        "--prl",
        nargs="?",
        const="modulated",
        choices=["modulated", "shared", "both"],
        help="also fit PRL with a shared top: modulated by the preference, or not, or both",
    )
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
    parser.add_argument(
        "--skip-single",
        action="store_true",
        help="of the models with a trainable top, only the multi-expert ones",
    )
    parser.add_argument(
        "--validation-pool",
        action="store_true",
        help="score TopStage variants on training images outside the long-tailed set, not test",
    )
    parser.add_argument(
        "--variants",
        help="TopStage settings, JSON (replaces --train; --validation-pool: default "
        + DEFAULT_VARIANTS
        + ")",
    )
    parser.add_argument(
        "--views",
        type=int,
        default=0,
        help="fine-tune BalancedSoftmax's tops on this many augmented views of each map too",
    )
    args = parser.parse_args()
    if not (SHARED / "cifar10-train-jpg.zip").exists():
        sys.exit(f"needs the shared CIFAR-10 JPEGs in {SHARED}")
    RESULTS.mkdir(exist_ok=True)
    train_labels = np.array(ImageFolderSource(SHARED / "cifar10-train-jpg.zip").labels)
    if args.validation_pool:
        for ratio in args.imbalance_ratios:
            for seed in args.seeds:
                validation_pool(args, train_labels, ratio, seed)
        return
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
            variants = json.loads(args.variants or "null") or [{"train": t} for t in args.train]
            for variant in [] if args.skip_single else variants:
                settings = ", ".join(f"{k}={v!r}" for k, v in variant.items())
                models.append(
                    (
                        f"BalancedSoftmax, TopStage({settings})"
                        + (f", {args.views} views" if args.views else ""),
                        BalancedSoftmaxClassifier,
                        {"head": TopStage(cut=args.cut, **variant)},
                        A_train,
                        A_test,
                    )
                )
            # The multi-expert models with each variant's top settings, every expert its own.
            for variant in variants if args.sade or args.ride or args.prl else []:
                settings = ", ".join(
                    f"{k}={v!r}" for k, v in {**variant, "experts": args.experts}.items()
                )
                stage = TopStage(cut=args.cut, experts=args.experts, **variant)
                if args.sade:
                    models.append(
                        (
                            f"SADE {args.expert_head}, TopStage({settings})"
                            + (f", {args.views} views" if args.views else ""),
                            SADEClassifier,
                            {"head": stage, "expert_head": args.expert_head},
                            A_train,
                            A_test,
                        )
                    )
                if args.ride:
                    models.append(
                        (
                            f"RIDE, TopStage({settings})",
                            RIDEClassifier,
                            {"head": stage},
                            A_train,
                            A_test,
                        )
                    )
                for modulate in prl_modulations(args):
                    models.append(
                        (
                            f"{prl_label(modulate)}, TopStage("
                            + ", ".join(f"{k}={v!r}" for k, v in variant.items())
                            + ")"
                            + (f", {args.views} views" if args.views else ""),
                            PRLClassifier,
                            {"head": stage, "modulate_top": modulate},
                            A_train,
                            A_test,
                        )
                    )
            V = train_views(args, keep, train_ids, path.stem, seed) if args.views else None
            for name, cls, params, X_fit, X_eval in models:
                top = X_fit is A_train
                start = time.perf_counter()
                model = cls(random_state=seed, **params).fit(
                    X_fit, y_train, views=V if top else None
                )
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
                if top and model._recalibrates_top and model.head.recalibrate:
                    uncorrected = uncorrected_score(model, X_eval, y_test)
                    print(f"  without the recalibration: {uncorrected:.2f}")
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
        "uniform, mirror view",
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
                f"{row[k]:.2f}"
                if isinstance(row[k], float)
                else "-"
                if row[k] is None
                else str(row[k])
                for k in keys
            )
            + " |"
        )


if __name__ == "__main__":
    main()
