"""Named extraction recipes: what ``recipe="layers-views"`` stores, and reading it back to fit."""

import json

import h5py
import numpy as np
import pytest
import torch

from ltlearn import BalancedSoftmaxClassifier
from ltlearn.cli import main
from ltlearn.exceptions import FeatureFileError
from ltlearn.features import FeatureFile, extract, write_features
from ltlearn.features import backbones as backbones_module
from ltlearn.features.backbones import from_module
from ltlearn.features.recipes import RECIPES, PadCropFlip

Image = pytest.importorskip("PIL.Image")

RECIPE = "layers-views"
OPTIONS = dict(engine="torch", device="cpu", num_workers=0, verbose=False)


class _TinyLite(torch.nn.Module):
    """A random network with EfficientNet-Lite0's block names, a few hundred weights."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        blocks = [torch.nn.Identity() for _ in range(14)]
        blocks += [torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Conv2d(4, 5, 3)]
        self.model._blocks = torch.nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.model._blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


def tiny_lite():
    torch.manual_seed(0)
    return from_module(
        _TinyLite(), input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, name="tiny-lite"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class image folder of 6 + 4 + 2 random 20-pixel images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, n in (("ant", 6), ("bee", 4), ("cow", 2)):
        (root / c).mkdir()
        for i in range(n):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def _layout(path):
    """Every data set's shape and dtype, and the root attributes but the creation time."""
    datasets = {}

    def note(name, item):
        if isinstance(item, h5py.Dataset):
            datasets[name] = (item.shape, item.dtype)

    with h5py.File(path, "r") as f:
        f.visititems(note)
        attrs = {key: value for key, value in f.attrs.items() if key != "created"}
    return datasets, attrs


def test_the_recipe_stores_its_layers_and_views(folder, tmp_path):
    out = extract(folder, tiny_lite(), tmp_path / "r.h5", recipe=RECIPE, **OPTIONS)
    layers = extract(
        folder,
        tiny_lite(),
        tmp_path / "l.h5",
        layers=["model._blocks.14", "model._blocks.15"],
        **OPTIONS,
    )
    with FeatureFile(out) as f, FeatureFile(layers) as g:
        assert f.attrs["recipe"] == RECIPE
        assert json.loads(f.attrs["layers"]) == ["model._blocks.14", "model._blocks.15"]
        assert f.feature_groups == [("model._blocks.14", 4), ("model._blocks.15", 5)] + [
            ("embedding", 5)
        ]
        assert f.views("train").shape == (12, RECIPES[RECIPE].views, 14)
        # The plain rows are those of the layers alone: the recipe adds views, nothing else.
        np.testing.assert_allclose(f.read("train")[0], g.read("train")[0], atol=2e-3)
        assert g.views("train") is None and "recipe" not in g.attrs


def test_read_with_views_feeds_the_estimators_as_they_are(folder, tmp_path):
    out = extract(folder, tiny_lite(), tmp_path / "r.h5", recipe=RECIPE, **OPTIONS)
    with FeatureFile(out) as f:
        X, y, V = f.read_with_views("train")
        X_part, y_part, V_part = f.read_with_views("train", start=2, stop=5)
    assert X.shape == (12, 14) and X.dtype == np.float32
    assert V.shape == (12, 2, 14) and V.dtype == np.float32
    assert y.tolist() == [0] * 6 + [1] * 4 + [2] * 2
    np.testing.assert_array_equal(X_part, X[2:5])
    np.testing.assert_array_equal(V_part, V[2:5])
    np.testing.assert_array_equal(y_part, y[2:5])
    clf = BalancedSoftmaxClassifier(max_epochs=3, random_state=0).fit(X, y, views=V)
    assert clf.predict(X, views=V).shape == (12,)
    assert clf.predict_proba(X, views=V).shape == (12, 3)

    plain = tmp_path / "plain.h5"
    write_features(plain, {"train": (X, y)}, classes=["ant", "bee", "cow"])
    with FeatureFile(plain) as f, pytest.raises(FeatureFileError, match="has no views in split"):
        f.read_with_views("train")


def test_options_that_contradict_the_recipe_are_refused(folder, tmp_path):
    def run(backbone=None, **options):
        extract(folder, backbone or tiny_lite(), tmp_path / "x.h5", **options, **OPTIONS)

    with pytest.raises(ValueError, match=r"combined with layers=\['model._blocks.15'\]"):
        run(recipe=RECIPE, layers=["model._blocks.15"])
    with pytest.raises(ValueError, match=r"combined with views=3, view_transform=PadCropFlip"):
        run(recipe=RECIPE, views=3, view_transform=PadCropFlip())
    with pytest.raises(ValueError, match="combined with cut='model._blocks.15'"):
        run(recipe=RECIPE, cut="model._blocks.15")
    with pytest.raises(ValueError, match=r"recipe must be one of \['layers-views'\]; got 'best'"):
        run(recipe="best")
    other = from_module(torch.nn.Conv2d(3, 4, 16), input_size=16, name="other")
    with pytest.raises(ValueError, match=r"backbone other has no \['model._blocks.14', "):
        run(other, recipe=RECIPE)
    assert not (tmp_path / "x.h5").exists()


def test_the_command_line_writes_what_python_writes(folder, tmp_path, monkeypatch, capsys):
    # The command's default backbone, efficientnet-lite0, replaced by the tiny network.
    monkeypatch.setattr(backbones_module, "efficientnet_lite0", tiny_lite)
    cli = tmp_path / "cli.h5"
    argv = ["extract", "--recipe", RECIPE, "--engine", "torch", "--device", "cpu", "--quiet"]
    assert main([*argv, str(folder), str(cli)]) == 0
    python = extract(folder, "efficientnet-lite0", tmp_path / "python.h5", recipe=RECIPE, **OPTIONS)
    assert _layout(cli) == _layout(python)
    datasets, attrs = _layout(cli)
    assert datasets["train/views"][0] == (12, 2, 14)
    assert attrs["recipe"] == RECIPE and attrs["backbone"] == "tiny-lite"
    with FeatureFile(cli) as f, FeatureFile(python) as g:
        np.testing.assert_array_equal(f.read("train")[0], g.read("train")[0])

    assert main([*argv, str(folder), str(tmp_path / "y.h5"), "--layers", "model._blocks.15"]) == 1
    assert "cannot be combined with layers=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    assert all(name in capsys.readouterr().out for name in RECIPES)


def test_pad_crop_flip_is_torchvisions_crop_and_flip_on_32_pixels():
    transforms = pytest.importorskip("torchvision.transforms")
    reference = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
        ]
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    ours = PadCropFlip()
    for seed in range(20):
        torch.manual_seed(seed)
        a = np.asarray(ours(image))
        torch.manual_seed(seed)
        np.testing.assert_array_equal(a, np.asarray(reference(image)))
    # Other sizes keep their size, padded by an eighth of the shorter side.
    assert ours(Image.new("RGB", (48, 20))).size == (48, 20)
    assert ours(Image.new("RGB", (1, 1))).size == (1, 1)
    with pytest.raises(ValueError, match="padding must be a fraction in"):
        PadCropFlip(padding=4)
