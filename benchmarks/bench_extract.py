"""Feature extraction speed and memory: the full pipeline against its engine's bare forward pass.

On images of ../shared/data/cifar10-test-jpg.zip with EfficientNet-Lite0, in the
same run:

- the engine's bare forward pass on batches held in memory (onnxruntime, the
  CPU default), fed float32 images preprocessed by PIL as before, and fed the
  uint8 images with the resize inside the exported graph, as ``extract`` now
  does;
- the ``extract`` pipeline (zip -> decode -> model -> HDF5) with its default
  settings and with one loader worker, and the previous pipeline (PIL resize
  and normalisation in a worker process, float32 batches) as the baseline;
  the ratio to the bare forward pass is the cost of everything but the model
  (target >= 0.9);
- the features against ../shared/data/cifar10_effnetlite0.h5 (mean cosine,
  matched by id; target >= 0.9999), and peak resident memory on N and 4N
  images (it must not grow with the data set);
- with ``--engines``, other CPU engines: eager torch, TorchScript, torch.compile;
- with ``--full``, the whole of CIFAR-10 (50,000 training and 10,000 test
  images) with the default settings, then with 2 augmented views per image;
- with ``--cut NAME``, activations at a cut (``extract(cut=NAME)``): the bare
  forward pass of the exported trunk, ``extract`` with its default (no
  compression of the activations) and with gzip as before (target >= 0.9 of
  the bare forward), and each file's size.

    python benchmarks/bench_extract.py [--images 2048] [--engines] [--full] [--cut model._blocks.14]
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from measure import PeakRSS

from ltlearn.features import FeatureFile, extract
from ltlearn.features.backbones import efficientnet_lite0
from ltlearn.features.extract import _Embedding, _OnnxRuntime
from ltlearn.features.resize import ResizeNormalize
from ltlearn.features.sources import ImageFolderSource

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"


class _Subset(torch.utils.data.Dataset):
    def __init__(self, source, indices):
        self.source, self.indices = source, indices
        self.classes = source.classes
        self.ids = [source.ids[i] for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


class _PILOnly:
    """The backbone's preprocessing without ``resize_spec``: the previous pipeline."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, image):
        return self.preprocess(image)

    def __repr__(self):
        return repr(self.preprocess)


def images_per_second(forward, batches):
    forward(batches[0])  # warm-up: first-call allocations, compilation
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def mean_cosine(path, split, reference_file):
    with FeatureFile(path) as f:
        X, ids = f.read(split)[0], f.ids(split)
    with FeatureFile(reference_file) as f:
        position = {key: i for i, key in enumerate(f.ids(split))}
        rows = np.array([position[key] for key in ids])
        order = np.argsort(rows)
        reference = np.empty_like(X)
        reference[order] = f.read(split)[0][rows[order]]
    cosine = (
        np.sum(X * reference, 1) / np.linalg.norm(X, axis=1) / np.linalg.norm(reference, axis=1)
    )
    return float(cosine.mean())


def pipeline(source, backbone, tmp, name, warm_cache=None, **options):
    """Images/s of a whole extract() run; the ONNX export comes from a previous run's cache."""
    out = Path(tmp) / f"{name}.h5"
    if warm_cache is not None:
        for cached in Path(tmp).glob(f"{warm_cache}.h5*.onnx"):
            out.with_name(cached.name.replace(warm_cache, name, 1)).write_bytes(cached.read_bytes())
    start = time.perf_counter()
    extract(source, backbone, out, split="test", verbose=False, **options)
    return len(source) / (time.perf_counter() - start), out


def engines_table(backbone, batches, batches_uint8):
    module = backbone.module
    rows = []
    with torch.inference_mode():
        rows.append(("bare forward, eager torch", images_per_second(module, batches)))
        frozen = torch.jit.optimize_for_inference(
            torch.jit.freeze(torch.jit.trace(module.eval(), batches[0]))
        )
        rows.append(
            ("bare forward, TorchScript frozen + optimised", images_per_second(frozen, batches))
        )
        compiled = torch.compile(module)
        start = time.perf_counter()
        compiled(batches[0])
        first = time.perf_counter() - start
        rows.append(
            (
                f"bare forward, torch.compile (first call {first:.0f} s)",
                images_per_second(compiled, batches),
            )
        )
    print("\n| other CPU engines | images/s |")
    print("|---|---|")
    for label, rate in rows:
        print(f"| {label} | {rate:.1f} |")


def cut_table(subset, backbone, cut, resize, batches_uint8, tmp):
    trunk, _ = backbone.split(cut)
    with torch.inference_mode():
        bare = images_per_second(
            _OnnxRuntime(
                _Embedding(backbone, resize, trunk=trunk), Path(tmp) / "c.onnx", True, "c"
            ),
            batches_uint8,
        )
    pipeline(_Subset(subset, range(8)), backbone, tmp, "warm_cut", cut=cut)
    rows = [("bare forward of the trunk, onnxruntime, uint8 input", bare, None)]
    for label, compression in (
        ("extract(cut=...), default: no compression", "auto"),
        ("extract(cut=...), gzip (the default before)", "gzip"),
    ):
        rate, out = pipeline(
            subset,
            backbone,
            tmp,
            f"cut_{compression}",
            "warm_cut",
            cut=cut,
            compression=compression,
        )
        rows.append((label, rate, out.stat().st_size / 2**20))
    print(f"\n| activations at {cut} | images/s | vs bare forward | file MiB |")
    print("|---|---|---|---|")
    for label, rate, mib in rows:
        size_text = "" if mib is None else f"{mib:.0f}"
        print(f"| {label} | {rate:.1f} | {rate / bare:.2f} | {size_text} |")


def full_run(backbone, batch_size):
    from torchvision import transforms

    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    )
    print("\n| whole CIFAR-10, default settings | images | seconds | images/s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for views in (0, 2):
            out = Path(tmp) / f"cifar10-{views}.h5"
            total, seconds = 0, 0.0
            for split in ("train", "test"):
                source = ImageFolderSource(SHARED / f"cifar10-{split}-jpg.zip", prefix=split)
                start = time.perf_counter()
                extract(
                    source,
                    backbone,
                    out,
                    split=split,
                    batch_size=batch_size,
                    views=views,
                    view_transform=augment if views else None,
                    verbose=False,
                )
                seconds += time.perf_counter() - start
                total += len(source)
            label = "plain" if not views else f"plain + {views} augmented views"
            embedded = total * (1 + views)
            print(
                f"| {label} | {total:,} ({embedded:,} embeddings) | {seconds:.0f} | "
                f"{total / seconds:.1f} ({embedded / seconds:.1f} embeddings/s) |",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zip", type=Path, default=SHARED / "cifar10-test-jpg.zip")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--engines", action="store_true", help="also time other CPU engines")
    parser.add_argument("--full", action="store_true", help="also extract the whole CIFAR-10")
    parser.add_argument("--cut", help="also time extract(cut=CUT), e.g. model._blocks.14")
    args = parser.parse_args()
    if not args.zip.exists():
        raise SystemExit(f"{args.zip} not found; pass --zip FILE.")
    source = ImageFolderSource(args.zip, prefix="test")
    picks = np.linspace(0, len(source) - 1, args.images).astype(int)
    subset = _Subset(source, picks)
    backbone = efficientnet_lite0()
    sample = [subset[i][0] for i in range(min(256, len(subset)))]
    floats = torch.stack([backbone.preprocess(image) for image in sample])
    uint8 = torch.stack(
        [torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()) for image in sample]
    )
    batches = list(torch.split(floats, args.batch_size))
    batches_uint8 = list(torch.split(uint8, args.batch_size))
    print(f"{len(subset)} images, batches of {args.batch_size}, {torch.get_num_threads()} threads")

    pil_only = dataclasses.replace(backbone, preprocess=_PILOnly(backbone.preprocess))
    with tempfile.TemporaryDirectory() as tmp:
        size, scale, shift = backbone.preprocess.resize_spec()
        resize = ResizeNormalize(tuple(uint8.shape[-2:]), size, scale, shift)
        with torch.inference_mode():
            bare_float = images_per_second(
                _OnnxRuntime(_Embedding(backbone), Path(tmp) / "f.onnx", True, backbone.name),
                batches,
            )
            bare_uint8 = images_per_second(
                _OnnxRuntime(_Embedding(backbone, resize), Path(tmp) / "u.onnx", True, "u"),
                batches_uint8,
            )
        # One run fills the export caches; the timed runs reuse them, as a rerun would.
        pipeline(_Subset(source, picks[:8]), backbone, tmp, "warm")
        pipeline(_Subset(source, picks[:8]), pil_only, tmp, "warm_pil")
        default, out = pipeline(subset, backbone, tmp, "default", warm_cache="warm")
        one_worker, _ = pipeline(subset, backbone, tmp, "one", warm_cache="warm", num_workers=1)
        before, _ = pipeline(subset, pil_only, tmp, "before", "warm_pil", num_workers=1)
        reference = SHARED / "cifar10_effnetlite0.h5"
        cosine = mean_cosine(out, "test", reference) if reference.exists() else float("nan")

        print(
            "\n| path | images/s | vs bare forward, uint8 + resize in graph | vs bare, float in |"
        )
        print("|---|---|---|---|")
        rows = [
            ("bare forward, onnxruntime, float32 input (PIL-preprocessed)", bare_float),
            ("bare forward, onnxruntime, uint8 input, resize in the graph", bare_uint8),
            ("extract(), default (no loader worker on the CPU)", default),
            ("extract(), 1 loader worker", one_worker),
            ("previous pipeline: PIL resize in 1 worker, float32 batches", before),
        ]
        for label, rate in rows:
            print(f"| {label} | {rate:.1f} | {rate / bare_uint8:.2f} | {rate / bare_float:.2f} |")
        print(f"\nFeatures against the shared file: mean cosine {cosine:.7f}, {len(subset)} images")

        print("\n| images extracted | peak RSS above start (MiB) |")
        print("|---|---|")
        for n in (len(subset) // 4, len(subset)):
            with PeakRSS() as mem:
                pipeline(_Subset(source, picks[:n]), backbone, tmp, f"m{n}", warm_cache="warm")
            print(f"| {n} | {mem.mib:.0f} |")
        if args.cut:
            cut_table(subset, backbone, args.cut, resize, batches_uint8, tmp)

    if args.engines:
        engines_table(backbone, batches, batches_uint8)
    if args.full:
        full_run(backbone, args.batch_size)


if __name__ == "__main__":
    main()
