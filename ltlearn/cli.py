"""The ``ltlearn`` command line: ``demo``, ``info``, ``extract`` and ``merge``."""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ltlearn import __version__

# Digits has at most ~90 training images a class: the usual many > 100 / few < 20
# split would leave "many" empty, so its demo uses smaller thresholds.
DIGITS_THRESHOLDS = (50, 20)
FEATURE_THRESHOLDS = (100, 20)


def _load_demo_data(args):
    from ltlearn.datasets import load_long_tailed_digits, long_tailed_subset
    from ltlearn.features import FeatureFile

    if args.features is None:
        ir = 10 if args.imbalance_ratio is None else args.imbalance_ratio
        data = load_long_tailed_digits(imbalance_ratio=ir, random_state=args.seed)
        title = f"scikit-learn digits, long-tailed training half (IR {ir:g}), balanced test half"
        return data.X_train, data.y_train, data.X_test, data.y_test, title, DIGITS_THRESHOLDS
    ir = 100 if args.imbalance_ratio is None else args.imbalance_ratio
    with FeatureFile(args.features) as f:
        for split in ("train", "test"):
            if split not in f.splits:
                raise SystemExit(
                    f"ltlearn demo: {args.features} has no '{split}' split (it has {f.splits})."
                )
        X_pool, y_pool = f.read("train")
        X_test, y_test = f.read("test")
    keep = long_tailed_subset(y_pool, ir, random_state=args.seed)
    title = f"{args.features}: long-tailed train split (IR {ir:g}), full test split"
    return X_pool[keep], y_pool[keep], X_test, y_test, title, FEATURE_THRESHOLDS


def _demo(args):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
    from ltlearn.metrics import shot_accuracy

    X, y, X_test, y_test, title, thresholds = _load_demo_data(args)
    many_t = thresholds[0] if args.many_threshold is None else args.many_threshold
    few_t = thresholds[1] if args.few_threshold is None else args.few_threshold
    counts = np.bincount(y)
    print(f"Data: {title}")
    print(f"Training class sizes (largest to smallest): {sorted(counts.tolist(), reverse=True)}")
    print(f"Shot groups: many > {many_t:g}, few < {few_t:g} training samples; test: {len(y_test)}")

    common = {"device": args.device, "random_state": args.seed}
    models = {
        "BalancedSoftmaxClassifier()": BalancedSoftmaxClassifier(**common),
        "BalancedSoftmaxClassifier(head='mlp')": BalancedSoftmaxClassifier(head="mlp", **common),
        "BalancedSoftmaxClassifier(tau=0) [plain CE]": BalancedSoftmaxClassifier(tau=0, **common),
        "PRLClassifier() [uniform preference]": PRLClassifier(**common),
        "LogisticRegression [scikit-learn reference]": make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=1000)
        ),
    }
    # The first torch call of a process pays a one-off start-up cost; keep it out of the timings.
    warm_up = np.random.default_rng(0).normal(size=(64, X.shape[1]))
    BalancedSoftmaxClassifier(max_epochs=1, device=args.device).fit(warm_up, np.arange(64) % 2)
    header = f"{'model':46s} {'overall':>8s} {'many':>6s} {'medium':>7s} {'few':>6s} {'fit s':>7s}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, model in models.items():
        start = time.perf_counter()
        model.fit(X, y)
        seconds = time.perf_counter() - start
        acc = shot_accuracy(
            y_test,
            model.predict(X_test),
            counts,
            labels=np.arange(len(counts)),
            many_threshold=many_t,
            few_threshold=few_t,
        )
        cells = " ".join(
            f"{'-' if np.isnan(acc[k]) else f'{100 * acc[k]:.1f}':>{w}s}"
            for k, w in (("overall", 8), ("many", 6), ("medium", 7), ("few", 6))
        )
        print(f"{name:46s} {cells} {seconds:7.2f}", flush=True)
    print("\nAccuracy in % on the balanced test set; many/medium/few average per-class accuracy.")
    return 0


def _short(name, width=40):
    # Long names (ImageNet's synonym lists) would push the counts off the screen.
    return name if len(name) <= width else name[: width - 3] + "..."


def _imbalance(counts, classes):
    """A split's imbalance ratio (largest over smallest class), the classes it comes from."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        return "no rows"
    largest = present[np.argmax(counts[present])]
    smallest = present[np.argmin(counts[present])]
    if counts[largest] == counts[smallest]:
        text = f"imbalance ratio 1.0: {counts[largest]} rows per class"
    else:
        text = (
            f"imbalance ratio {counts[largest] / counts[smallest]:.1f}: from {counts[largest]} "
            f"rows ({_short(classes[largest])!r}) to {counts[smallest]} "
            f"({_short(classes[smallest])!r})"
        )
    missing = len(counts) - present.size
    if missing:
        # An empty class would make the ratio infinite: say that the ratio leaves it out.
        verb = "has" if missing == 1 else "have"
        text += f"; {missing} of {len(counts)} classes {verb} no rows (left out of the ratio)"
    return text


def _class_table(classes, counts, max_classes):
    """Rows per class and split, in label order, the first ``max_classes`` classes (0: all)."""
    shown = len(classes) if max_classes == 0 else min(max_classes, len(classes))
    width = max(len(_short(c)) for c in ["class", *classes[:shown]])
    splits = list(counts)
    widths = [max(len(s), len(str(counts[s].max(initial=0)))) for s in splits]
    header = "".join(f"  {s:>{w}}" for s, w in zip(splits, widths, strict=True))
    lines = ["  " + "class".ljust(width) + header]
    for label in range(shown):
        cells = "".join(f"  {counts[s][label]:>{w}}" for s, w in zip(splits, widths, strict=True))
        lines.append("  " + _short(classes[label]).ljust(width) + cells)
    if shown < len(classes):
        lines.append(
            f"  ... {len(classes) - shown} more classes (--max-classes 0 lists every class)"
        )
    return lines


def _info(args):
    from ltlearn.features import FeatureFile, read_metadata

    meta = read_metadata(args.file)
    classes = meta["classes"]
    with FeatureFile(args.file) as f:
        counts = {
            split: np.bincount(f.labels(split), minlength=len(classes)) for split in meta["splits"]
        }
    print(f"{args.file}: {len(classes)} classes")
    for split, info in meta["splits"].items():
        print(
            f"  {split}: {info['n_rows']} rows x {info['n_features']} features "
            f"({info['dtype']}{', with ids' if info['has_ids'] else ''})"
        )
        print(f"    {_imbalance(counts[split], classes)}")
    for key, value in meta["attrs"].items():
        print(f"  {key}: {value}")
    print("\nRows per class:")
    print("\n".join(_class_table(classes, counts, args.max_classes)))
    return 0


def _source(args):
    from ltlearn.features.sources import open_source

    return open_source(
        args.source,
        split=args.split or "train",
        prefix=args.prefix,
        list_file=args.list_file,
        root=args.root,
    )


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more; got {value}")
    return value


def _parse_shard(text):
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected i/n, e.g. 0/4; got {text!r}") from exc
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= i < n; got {text!r}")
    return index, count


def _extract(args):
    from ltlearn.features import FeatureFile, extract
    from ltlearn.features.backbones import load_backbone

    source = _source(args)
    split = args.split or getattr(source, "prefix", "") or "train"
    backbone = load_backbone(args.backbone)
    rows_before = None
    if Path(args.output).exists() and not args.overwrite:
        try:
            with FeatureFile(args.output) as f:
                rows_before = f.n_rows(split) if split in f.splits else 0
        except ValueError:  # unfinished or foreign: extract() says what is wrong
            rows_before = None
    out = extract(
        source,
        backbone,
        args.output,
        split=split,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        engine=args.engine,
        layers=args.layers,
        cut=args.cut,
        recipe=args.recipe,
        dtype=args.dtype,
        overwrite=args.overwrite,
        on_error=args.on_error,
        shard=args.shard,
        random_state=args.seed,
        verbose=not args.quiet,
    )
    if not args.quiet:
        with FeatureFile(out) as f:
            rows = f.n_rows(split)
        if rows_before is not None and rows == rows_before:
            print(f"{out} is already complete: {rows} rows in split '{split}'; nothing to do.")
        else:
            print(f"wrote {out}: {rows} rows in split '{split}'")
        exports = sorted(Path(out).parent.glob(Path(out).name + "*.onnx"))
        if exports:
            print(
                "ONNX export cached for the next run (delete when done): "
                + ", ".join(str(p) for p in exports)
            )
    return 0


def _merge(args):
    from ltlearn.features import merge

    merge(args.shards, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output} from {len(args.shards)} shard(s)")
    return 0


def build_parser():
    """The argument parser of the ``ltlearn`` command."""
    parser = argparse.ArgumentParser(
        prog="ltlearn", description="Long-tailed classification on frozen features."
    )
    parser.add_argument("--version", action="version", version=f"ltlearn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="fit ltlearn's classifiers on a long-tailed data set and print their accuracy",
        description="Fit ltlearn's classifiers (and a LogisticRegression reference) on a "
        "long-tailed training set and print overall / many / medium / few accuracy on a "
        "balanced test set, with fit times. Without --features, uses scikit-learn's digits.",
    )
    demo.add_argument(
        "--features", metavar="FILE.h5", help="feature file with train and test splits"
    )
    demo.add_argument(
        "--imbalance-ratio",
        type=float,
        metavar="IR",
        help="imbalance ratio of the training set (default: 100 for --features, 10 for digits)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N")
    demo.add_argument(
        "--many-threshold", type=float, help="many-shot: more training samples than this"
    )
    demo.add_argument(
        "--few-threshold", type=float, help="few-shot: fewer training samples than this"
    )
    demo.set_defaults(run=_demo)

    info = commands.add_parser(
        "info",
        help="describe a feature file: splits, rows per class, imbalance ratio",
        description="Print the splits of an ltlearn feature file (rows, width, storage type, "
        "and the imbalance ratio: the largest class's rows over the smallest's), its provenance "
        "attributes, and a table of rows per class and split. Reads the labels, not the "
        "features.",
    )
    info.add_argument("file", metavar="FILE.h5", help="the feature file to describe")
    info.add_argument(
        "--max-classes",
        type=_non_negative_int,
        default=20,
        metavar="N",
        help="list the first N classes in label order; 0 lists every class (default: 20)",
    )
    info.set_defaults(run=_info)

    extract = commands.add_parser(
        "extract",
        help="embed an image set with a frozen backbone into a feature file",
        description="Run a backbone over an image set and write its embeddings, labels and ids "
        "to an HDF5 feature file. An existing output file is resumed (same backbone and "
        "classes only) unless --overwrite is given.",
    )
    extract.add_argument(
        "source",
        metavar="SOURCE",
        help="image folder (<class>/<file>), a .zip of one, a CIFAR python directory, "
        "or a list file of 'path label' lines",
    )
    extract.add_argument(
        "output",
        metavar="OUT.h5",
        help="feature file to write the split into; an existing one is resumed, or gains the "
        "split beside those it holds",
    )
    extract.add_argument(
        "--backbone",
        default="efficientnet-lite0",
        help="efficientnet-lite0 (default), open_clip:<model>:<pretrained tag> (tag 'random' "
        "for random weights), torchvision:<arch>:<weights file>, or a TorchScript / "
        "torch.export file",
    )
    extract.add_argument(
        "--split",
        help="split name in the file (default: the source's single top-level folder, e.g. "
        "'test' for a zip of test/<class>/<file>, else 'train')",
    )
    extract.add_argument("--prefix", help="folder inside the source that holds the class folders")
    extract.add_argument("--list-file", action="store_true", help="SOURCE is a list file")
    extract.add_argument("--root", help="directory the paths of a list file are relative to")
    extract.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="images per forward pass of the backbone; lower it if memory runs out (default: 64)",
    )
    extract.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="data-loading processes (default: none on the CPU, where they would compete with "
        "the engine for the cores; min(8, cores - 1) on a GPU)",
    )
    extract.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    extract.add_argument(
        "--engine",
        choices=["auto", "torch", "onnxruntime"],
        default="auto",
        help="'auto' runs a module on the CPU through onnxruntime when the onnx extra is "
        "installed, exported once and cached beside the output as OUT.h5.onnx (and "
        "OUT.h5.<H>x<W>.onnx for the resize step); 'torch' writes no cache (default: auto)",
    )
    extract.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="also store these submodules' pooled outputs before the embedding, e.g. "
        "model._blocks.10 model._blocks.15 for efficientnet-lite0 (for SHIKEClassifier)",
    )
    extract.add_argument(
        "--cut",
        metavar="NAME",
        help="store this submodule's unpooled activations instead of the embedding, e.g. "
        "model._blocks.14 for efficientnet-lite0, to train the backbone's top on them "
        "(head=TopStage(...)); about 19 KB per image there in float16",
    )
    extract.add_argument(
        "--recipe",
        metavar="NAME",
        help="store what a measured setting needs; 'layers-views': efficientnet-lite0's blocks "
        "14 and 15 beside the embedding and 2 augmented views (padded crop and mirror) of each "
        "image, for BalancedSoftmaxClassifier trained and tested on the views (78.6%% against "
        "76.8%% on CIFAR-10-LT, IR 100); excludes --layers and --cut",
    )
    extract.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the recipe's augmented views: the same seed gives the same views, "
        "whatever --workers, --batch-size, --shard or a resumed run (default: 0)",
    )
    extract.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="storage type of the features in OUT.h5; float16 stores half the bytes and is "
        "read back as float32 (default: float16)",
    )
    extract.add_argument("--overwrite", action="store_true", help="replace OUT.h5")
    extract.add_argument(
        "--on-error",
        choices=["skip", "raise"],
        default="skip",
        help="an image that cannot be decoded is skipped with a warning naming it (and listed "
        "in the split's 'skipped' attribute), or stops the run (default: skip)",
    )
    extract.add_argument(
        "--shard", type=_parse_shard, metavar="I/N", help="process the I-th of N slices"
    )
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(run=_extract)

    merge = commands.add_parser(
        "merge",
        help="join shard feature files into one (HDF5 virtual data sets, nothing copied)",
        description="Join the files written by 'ltlearn extract --shard I/N' into one feature "
        "file whose features, labels and views refer to the shards' rows: keep the shards where "
        "they are or beside OUT.h5 (opening OUT.h5 without them is an error naming them). "
        "OUT.h5 may not be one of the shards.",
    )
    merge.add_argument("output", metavar="OUT.h5", help="the merged feature file to write")
    merge.add_argument(
        "shards",
        nargs="+",
        metavar="SHARD.h5",
        help="the shard files, in the order their rows follow each other (0/N first)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace OUT.h5")
    merge.set_defaults(run=_merge)
    return parser


def main(argv=None):
    """Run the ``ltlearn`` command; returns its exit status.

    0 on success, 1 when the command failed (the error is printed), 2 for a
    command line that argparse rejects.
    """
    from ltlearn.exceptions import LtlearnError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (LtlearnError, OSError, ValueError, ImportError) as exc:
        print(f"ltlearn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
