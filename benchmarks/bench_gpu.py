"""The CUDA path against the CPU, in the same run: fits, prediction and extraction.

Needs a CUDA GPU (it says so and stops otherwise). On synthetic long-tailed
embeddings (Gaussian class means on a sphere plus noise, exponential class
profile), shaped like CIFAR-10-LT at IR 100 (12,406 x 1,280, 10 classes) and
like ImageNet-LT (about 116,000 x 1,024, 1,000 classes), it times the fit of
BalancedSoftmaxClassifier and PRLClassifier with device="cuda" and
device="cpu" (the GPU machine's own cores), and the accuracy of both on a
balanced synthetic test set, which must agree within seed noise. Then the
extraction of real CIFAR-10 test JPEGs with EfficientNet-Lite0: the extract()
pipeline on CUDA (pinned memory, float16 autocast) against the bare CUDA
forward pass on preprocessed batches, and the CPU pipeline.

    python benchmarks/bench_gpu.py [--zip ../shared/data/cifar10-test-jpg.zip] [--images 4096]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ltlearn import BalancedSoftmaxClassifier, PRLClassifier
from ltlearn.datasets import long_tail_counts

ZIP = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-test-jpg.zip"


def synthetic(counts, n_features, sample_seed, noise=2.0):
    """Long-tailed Gaussian classes around fixed means on a sphere of radius 1.5.

    The means depend on the shape only; ``sample_seed`` draws the samples.
    """
    means = np.random.default_rng(0).standard_normal((len(counts), n_features), dtype=np.float32)
    means *= 1.5 / np.linalg.norm(means, axis=1, keepdims=True)
    rng = np.random.default_rng(sample_seed)
    y = np.repeat(np.arange(len(counts)), counts)
    scale = noise / np.sqrt(n_features / 64)
    X = means[y] + scale * rng.standard_normal((len(y), n_features), dtype=np.float32)
    return X, y


def time_fits(label, counts, n_features, test_per_class):
    X, y = synthetic(counts, n_features, sample_seed=1)
    X_test, y_test = synthetic([test_per_class] * len(counts), n_features, sample_seed=2)
    print(f"\n### {label}: {len(y):,} x {n_features:,}, {len(counts):,} classes\n")
    print("| estimator | device | fit s | fit CPU / GPU | balanced test accuracy |")
    print("|---|---|---|---|---|")
    for make in (BalancedSoftmaxClassifier, PRLClassifier):
        seconds = {}
        for device in ("cuda", "cpu"):
            model = make(device=device, random_state=0)
            start = time.perf_counter()
            model.fit(X, y)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[device] = time.perf_counter() - start
            accuracy = model.score(X_test, y_test)
            ratio = "" if device == "cuda" else f"{seconds['cpu'] / seconds['cuda']:.1f}x"
            print(
                f"| {make.__name__} | {device} | {seconds[device]:.2f} | {ratio} | "
                f"{100 * accuracy:.1f} |",
                flush=True,
            )


def time_extraction(zip_file, n_images):
    import dataclasses

    from bench_extract import _PILOnly, _Subset

    from ltlearn.features import extract
    from ltlearn.features.backbones import efficientnet_lite0
    from ltlearn.features.sources import ImageFolderSource

    source = ImageFolderSource(zip_file, prefix="test")
    picks = np.arange(min(n_images, len(source)))
    backbone = efficientnet_lite0()
    images = torch.stack([backbone.preprocess(source[i][0]) for i in range(256)])
    module = backbone.module.cuda().eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        batch = images.cuda()
        module(batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(8):
            module(batch)
        torch.cuda.synchronize()
        bare = 8 * 256 / (time.perf_counter() - start)
    backbone.module.cpu()
    print(f"\n### Extraction, EfficientNet-Lite0 on CIFAR-10 test JPEGs ({len(picks)} images)\n")
    print("| path | images/s | vs bare CUDA forward |")
    print("|---|---|---|")
    print(f"| bare forward, CUDA float16 autocast, batches of 256 on the GPU | {bare:.0f} | 1.00 |")
    pil_only = dataclasses.replace(backbone, preprocess=_PILOnly(backbone.preprocess))
    runs = [
        ("extract() default: uint8 images, resize on the GPU, 8 workers", backbone, None),
        ("previous pipeline: PIL resize + float32 in 4 workers", pil_only, 4),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        extract(
            _Subset(source, picks[:256]), backbone, Path(tmp) / "w.h5", device="cuda", verbose=False
        )
        for label, chosen, workers in runs:
            start = time.perf_counter()
            extract(
                _Subset(source, picks),
                chosen,
                Path(tmp) / f"{workers}.h5",
                device="cuda",
                batch_size=256,
                num_workers=workers,
                verbose=False,
            )
            rate = len(picks) / (time.perf_counter() - start)
            print(f"| {label} | {rate:.0f} | {rate / bare:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zip", type=Path, default=ZIP)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--skip-imagenet", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU on this machine: nothing to measure.")
    print(
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    BalancedSoftmaxClassifier(device="cuda", max_epochs=1).fit(np.eye(4), [0, 1, 0, 1])
    time_fits("CIFAR-10-LT shape, IR 100", long_tail_counts(5000, 10, 100), 1280, 1000)
    if not args.skip_imagenet:
        time_fits("ImageNet-LT shape", long_tail_counts(560, 1000, 112), 1024, 20)
    if args.zip.exists():
        time_extraction(args.zip, args.images)
    else:
        print(f"\n{args.zip} not found: extraction not measured.")


if __name__ == "__main__":
    main()
