"""Extraction correctness (issue 27): layers, CIFAR detection, batch independence, clear errors."""

import importlib
import os
import pickle
import stat
import zipfile

import numpy as np
import pytest
import torch

from ltlearn.cli import main
from ltlearn.exceptions import LtlearnError
from ltlearn.features import FeatureFile, extract, read_features
from ltlearn.features.backbones import from_module
from ltlearn.features.sources import CIFARSource, ImageFolderSource, open_source

Image = pytest.importorskip("PIL.Image")
OPTIONS = dict(num_workers=0, device="cpu", verbose=False)


def tiny_backbone(name="tiny"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 8, stride=8), torch.nn.Flatten())
    return from_module(net, input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, name=name)


def save_images(root, layout, size=(20, 20), seed=0):
    """One random image per relative path in ``layout``."""
    rng = np.random.default_rng(seed)
    for name in layout:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    layout = [f"{c}/{i}.png" for c in ("ant", "bee") for i in range(2)]
    return save_images(tmp_path_factory.mktemp("images"), layout)


class _SharedReLU(torch.nn.Module):
    """Two convolutions sharing one activation module; ``conv1`` is followed by an in-place op."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.conv2 = torch.nn.Conv2d(4, 5, 3)
        self.relu = torch.nn.ReLU(inplace=True)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))


class _Tensors(torch.utils.data.TensorDataset):
    classes = ["a", "b"]


def test_layers_leave_the_embedding_alone_and_refuse_a_module_called_twice(tmp_path):
    torch.manual_seed(0)
    net = _SharedReLU().eval()
    images = torch.randn(4, 3, 10, 10)
    source = _Tensors(images, torch.tensor([0, 1, 0, 1]))
    backbone = from_module(net, preprocess=lambda x: x)
    path = extract(source, backbone, tmp_path / "f.h5", layers=["conv1"], engine="torch", **OPTIONS)
    with torch.no_grad():
        embedding = net(images).flatten(1).numpy()
        conv1 = net.conv1(images).mean(dim=(2, 3)).numpy()  # before the in-place ReLU
    with FeatureFile(path) as f:
        np.testing.assert_allclose(f.read("train", groups=["embedding"])[0], embedding, atol=2e-3)
        np.testing.assert_allclose(f.read("train", groups=["conv1"])[0], conv1, atol=2e-3)
    # A forward hook's return value replaces the output: the shared relu's second
    # call used to return its first output, a 4-wide "embedding" instead of 5.
    with pytest.raises(LtlearnError, match=r"\['relu'\].*more than once.*'relu': 2"):
        extract(source, backbone, tmp_path / "g.h5", layers=["relu"], engine="torch", **OPTIONS)
    # The refused run leaves no file behind that would read as "interrupted".
    assert not (tmp_path / "g.h5").exists()


def cifar10_directory(root, meta=None):
    """A CIFAR-10 python directory of random images; ``meta`` replaces batches.meta's dict."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump(meta or {b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=5)  # numpy's protocol-5 reconstruction is admitted
    return directory


class _Payload:
    """Unpickling it creates a file: the trace of code run by a planted pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_cifar_is_recognised_by_its_layout_and_a_planted_pickle_runs_nothing(tmp_path):
    # An image folder with a class called "meta" is an image folder.
    images = save_images(tmp_path / "images", ["meta/0.png", "meta/1.png", "other/0.png"])
    assert isinstance(open_source(images), ImageFolderSource)
    X, y = read_features(extract(images, tiny_backbone(), tmp_path / "m.h5", **OPTIONS))
    assert X.shape == (3, 24) and y.tolist() == [0, 0, 1]
    # So is one holding a stray file called batches.meta: it is never unpickled.
    marker = tmp_path / "ran"
    with open(images / "batches.meta", "wb") as f:
        pickle.dump(_Payload(marker), f)
    assert isinstance(open_source(images), ImageFolderSource) and not marker.exists()

    assert len(CIFARSource(cifar10_directory(tmp_path / "good"), "test")) == 3
    directory = cifar10_directory(tmp_path / "bad", meta={b"label_names": _Payload(marker)})
    with pytest.raises(ValueError, match="batches.meta.*refusing to load"):
        open_source(directory)
    assert not marker.exists()


def test_a_row_does_not_depend_on_the_sizes_of_its_batch_neighbours(tmp_path):
    """Alone, in a batch of one size (resized in the graph) or of mixed sizes (in the workers)."""
    rng = np.random.default_rng(3)
    # Portrait images, for which Pillow 13 runs its vertical pass first: PIL's
    # resize, which mixed batches used to take, differed by a level on many pixels.
    for name, size in [("a/0.png", (71, 33)), ("a/1.png", (71, 33)), ("b/0.png", (23, 41))]:
        (tmp_path / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / name)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3), torch.nn.Flatten()
    )
    backbone = from_module(net, input_size=(16, 13), name="wide")
    source = ImageFolderSource(tmp_path / "img")
    for engine in ("torch", "onnxruntime"):
        if engine == "onnxruntime":
            pytest.importorskip("onnxruntime")

        def rows(batch_size, engine=engine):
            out = tmp_path / f"{engine}{batch_size}.h5"
            extract(source, backbone, out, batch_size=batch_size, engine=engine, **OPTIONS)
            return read_features(out)[0]

        alone = rows(1)
        for other in (rows(2), rows(3)):  # image a/0 with a/1 (one size), with all three
            # Rows computed in float32 differ by kernel rounding at most: stored as
            # float16, by one rounding step where a value lies on a boundary (and
            # near zero, by far less than a step at the row's scale).
            step = np.spacing(np.abs(alone).astype(np.float16)).astype(np.float32)
            tolerance = np.maximum(step, 1e-4 * np.abs(alone).max())
            assert (np.abs(other - alone) <= tolerance).all(), np.abs(other - alone).max()


@pytest.mark.parametrize("content", [b"", b"\x08\x01garbage"])
def test_an_unreadable_onnx_cache_is_exported_again(folder, tmp_path, content):
    pytest.importorskip("onnxruntime")
    reference = read_features(
        extract(folder, tiny_backbone(), tmp_path / "t.h5", engine="torch", **OPTIONS)
    )[0]
    cache = tmp_path / "o.h5.20x20.onnx"
    cache.write_bytes(content)
    with pytest.warns(UserWarning, match="o.h5.20x20.onnx cannot be run.*exporting it again"):
        out = extract(folder, tiny_backbone(), tmp_path / "o.h5", engine="onnxruntime", **OPTIONS)
    np.testing.assert_allclose(read_features(out)[0], reference, atol=2e-3)
    assert cache.stat().st_size > 100


@pytest.mark.parametrize("split", ["a/b", "classes", "", ".", "..", 3])
def test_split_names_are_checked_before_anything_is_written(folder, tmp_path, split):
    with pytest.raises(ValueError, match="split must name one group"):
        extract(folder, tiny_backbone(), tmp_path / "f.h5", split=split, **OPTIONS)
    assert not (tmp_path / "f.h5").exists()


def test_a_source_folder_that_is_no_split_name_asks_for_split(folder, tmp_path):
    nested = save_images(tmp_path / "img", ["x/y/ant/0.png", "x/y/bee/0.png"])
    source = ImageFolderSource(nested, prefix="x/y")
    with pytest.raises(ValueError, match="source's folder 'x/y'.*split='train'"):
        extract(source, tiny_backbone(), tmp_path / "f.h5", **OPTIONS)
    out = extract(source, tiny_backbone(), tmp_path / "f.h5", split="test", **OPTIONS)
    assert FeatureFile(out).splits == ["test"]


def test_every_image_failing_is_an_error_and_a_rerun_tries_again(tmp_path):
    broken = tmp_path / "broken"
    for name in ("ant/0.png", "ant/1.png", "bee/0.png"):
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_bytes(b"not an image")
    for _ in range(2):  # the failed run leaves no progress that would make a rerun "finished"
        with (
            pytest.warns(UserWarning),
            pytest.raises(
                LtlearnError,
                match=r"None of the 3 images.*first failure: image 'ant/0.png'.*Unidentified",
            ),
        ):
            extract(broken, tiny_backbone(), tmp_path / "f.h5", **OPTIONS)


def test_the_output_must_be_a_regular_file(folder, tmp_path, capsys, monkeypatch):
    for target in (os.devnull, tmp_path):
        with pytest.raises(ValueError, match="not a regular file"):
            extract(folder, tiny_backbone(), target, **OPTIONS)
    monkeypatch.setattr("ltlearn.features.backbones.load_backbone", lambda spec: tiny_backbone())
    assert main(["extract", str(folder), os.devnull, "--workers", "0", "--device", "cpu"]) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_a_finished_output_is_only_read_again(folder, tmp_path, monkeypatch):
    path = extract(folder, tiny_backbone(), tmp_path / "f.h5", **OPTIONS)
    before = path.read_bytes()
    path.chmod(stat.S_IRUSR | stat.S_IRGRP)
    try:
        # As root the file stays writable: refusing to open a writer shows the same.
        def no_writer(*args, **kwargs):
            raise AssertionError("a finished file was opened for writing")

        module = importlib.import_module("ltlearn.features.extract")  # not the function
        monkeypatch.setattr(module, "FeatureWriter", no_writer)
        assert extract(folder, tiny_backbone(), path, **OPTIONS) == path
        assert path.read_bytes() == before
        # Another backbone is no "finished" file: the writer names the difference.
        with pytest.raises(AssertionError, match="opened for writing"):
            extract(folder, tiny_backbone("other"), path, **OPTIONS)
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_a_zip_with_two_layouts_or_paths_out_of_it_is_refused(folder, tmp_path):
    both = tmp_path / "both.zip"
    with zipfile.ZipFile(both, "w") as z:
        z.write(folder / "ant" / "0.png", "train/ant/0.png")
        z.write(folder / "bee" / "0.png", "bee/0.png")
    with pytest.raises(ValueError, match=r"both as <class>/<file>.*'bee/0.png'.*'train/ant/0.png'"):
        ImageFolderSource(both)
    assert ImageFolderSource(both, prefix="train").ids == ["train/ant/0.png"]
    for name in ("../c/x.png", "/c/x.png", "a/../../x.png"):
        escaping = tmp_path / "escaping.zip"
        with zipfile.ZipFile(escaping, "w") as z:
            z.write(folder / "ant" / "0.png", "ant/0.png")
            z.writestr(zipfile.ZipInfo(name), (folder / "bee" / "0.png").read_bytes())
        with pytest.raises(ValueError, match="points outside the archive"):
            ImageFolderSource(escaping)


def test_links_out_of_an_image_folder_are_refused(folder, tmp_path):
    root = save_images(tmp_path / "img", ["ant/0.png", "bee/0.png"])
    (root / "bee" / "1.png").symlink_to(root / "ant" / "0.png")  # inside: followed
    assert ImageFolderSource(root).ids == ["ant/0.png", "bee/0.png", "bee/1.png"]
    (root / "bee" / "2.png").symlink_to(folder / "ant" / "0.png")
    with pytest.raises(ValueError, match=r"bee/2.png.*outside the folder.*list file"):
        ImageFolderSource(root)
    (root / "bee" / "2.png").unlink()
    (root / "cow").symlink_to(folder / "ant", target_is_directory=True)
    with pytest.raises(ValueError, match="cow.*outside the folder"):
        ImageFolderSource(root)
