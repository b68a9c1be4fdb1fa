"""A trainable top stage on activations cached at a cut (extract(cut=...), TopStage)."""

import pickle

import h5py
import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch.utils.data import TensorDataset

from ltlearn import (
    BalancedSoftmaxClassifier,
    PRLClassifier,
    RIDEClassifier,
    SADEClassifier,
)
from ltlearn._base import TorchHeadClassifier
from ltlearn.datasets import long_tailed_subset
from ltlearn.exceptions import LtlearnError
from ltlearn.features import FeatureFile, extract, merge
from ltlearn.features.backbones import from_module
from ltlearn.features.io import FeatureSplit, FeatureWriter, write_features
from ltlearn.top_stage import TopStage, _Recalibrated


def small_top(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )


def two_layer_top(seed=0):
    """A top with a first part to freeze or share and a last part of its own."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )


def activations(n, seed=0):
    """Maps whose class is which channel carries the largest energy: pooling the
    raw maps averages the signed signal away, a trained ReLU layer recovers it."""
    rng = np.random.RandomState(seed)
    y = rng.randint(0, 4, n)
    X = rng.randn(n, 4, 3, 3)
    X[np.arange(n), y] *= 2.0
    return X.astype(np.float32), y


def few_maps_with_views():
    """60 training maps with 3 views each, a view being another draw of the row's class
    (what an augmented image adds), and 2,000 test maps."""
    X, y = activations(60)
    rng = np.random.RandomState(1)
    V = rng.randn(60, 3, 4, 3, 3).astype(np.float32)
    V[np.arange(60), :, y] *= 2.0
    X_test, y_test = activations(2000, seed=2)
    return X, y, V, X_test, y_test


class Images(TensorDataset):
    classes = ["a", "b"]


def test_efficientnet_trunk_then_top_reproduces_the_embedding():
    pytest.importorskip("efficientnet_lite_pytorch")
    from ltlearn.features.backbones import efficientnet_lite0

    backbone = efficientnet_lite0()
    images = torch.rand(3, 3, 224, 224) * 2 - 1
    trunk, top = backbone.split("model._blocks.14")
    with torch.no_grad():
        maps = trunk(images)
        cosine = torch.nn.functional.cosine_similarity(top(maps), backbone.embed(images))
    assert maps.shape == (3, 192, 7, 7)
    assert float(cosine.min()) > 0.9999
    # The halves are copies: training the top leaves the backbone alone.
    assert all(
        p.data_ptr() != q.data_ptr() for p in top.parameters() for q in backbone.module.parameters()
    )
    with pytest.raises(ValueError, match="model._blocks.0' ... 'model._blocks.15"):
        backbone.split("model._blocks.16")


def test_a_backbone_that_cannot_be_split_says_how():
    backbone = from_module(lambda x: x.mean(dim=(2, 3)), preprocess=lambda x: x, name="fn")
    with pytest.raises(ValueError, match="splitter="):
        backbone.split("anything")


def cut_backbone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    return from_module(net, preprocess=lambda x: x, name="toy")


def test_cut_file_round_trips_and_its_top_gives_the_embedding(tmp_path):
    images = Images(torch.rand(7, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0, 0]))
    backbone = cut_backbone()
    path = extract(
        images, backbone, tmp_path / "cut.h5", cut="1", engine="torch", batch_size=3, verbose=False
    )
    with FeatureFile(path) as f:
        X, y = f.read("train")
        assert f.row_shape == (4, 6, 6)
        assert f.attrs["cut"] == "1"
    assert X.shape == (7, 4, 6, 6) and y.tolist() == [0, 1, 0, 1, 1, 0, 0]
    _, top = backbone.split("1")
    with torch.no_grad():
        np.testing.assert_allclose(
            top(torch.from_numpy(X)).numpy(),
            backbone.embed(images.tensors[0]).numpy(),
            atol=2e-3,  # float16 storage
        )
    # A finished file is only read again; a file of embeddings is not resumed as a cut.
    assert extract(images, backbone, path, cut="1", engine="torch", verbose=False) == path
    embeddings = extract(images, backbone, tmp_path / "emb.h5", engine="torch", verbose=False)
    with pytest.raises(LtlearnError, match="cut"):
        extract(images, backbone, embeddings, cut="1", engine="torch", verbose=False)
    # Shards merge into one cut file that keeps its shape.
    shards = [
        extract(
            images,
            backbone,
            tmp_path / f"s{i}.h5",
            cut="1",
            shard=(i, 2),
            engine="torch",
            verbose=False,
        )
        for i in range(2)
    ]
    merged = merge(shards, tmp_path / "merged.h5")
    with FeatureFile(merged) as f:
        assert f.row_shape == (4, 6, 6)
        # Batches of other sizes may round a float16 value the other way.
        np.testing.assert_allclose(f.read("train")[0], X, atol=1e-3)


def test_cut_files_are_stored_uncompressed_unless_asked(tmp_path):
    images = Images(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    backbone = cut_backbone()

    def stored(**options):
        path = extract(
            images, backbone, tmp_path / f"{options}.h5", engine="torch", verbose=False, **options
        )
        with h5py.File(path, "r") as f:
            return f["train/features"].compression, f["train/features"][()]

    plain, rows = stored(cut="1")
    squeezed, same_rows = stored(cut="1", compression="gzip")
    assert (plain, squeezed, stored()[0]) == (None, "gzip", "gzip")
    np.testing.assert_array_equal(rows, same_rows)
    with pytest.raises(ValueError, match="compression must be 'auto', 'gzip', 'lzf' or None"):
        extract(images, backbone, tmp_path / "f.h5", compression="zstd", verbose=False)
    assert not (tmp_path / "f.h5").exists()


def test_cut_extraction_resumes_where_it_stopped(tmp_path):
    images = torch.rand(9, 3, 8, 8)
    labels = torch.tensor([0, 1] * 4 + [0])

    class Failing(Images):
        fail_at = 5

        def __getitem__(self, i):
            if i == self.fail_at:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    backbone = cut_backbone()
    path = tmp_path / "cut.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(
            Failing(images, labels),
            backbone,
            path,
            cut="1",
            engine="torch",
            batch_size=2,
            verbose=False,
        )
    with FeatureFile(path) as f:
        assert 0 < f.n_rows("train") < 9
    Failing.fail_at = -1
    extract(Failing(images, labels), backbone, path, cut="1", engine="torch", verbose=False)
    whole = extract(
        Images(images, labels),
        backbone,
        tmp_path / "whole.h5",
        cut="1",
        engine="torch",
        verbose=False,
    )
    with FeatureFile(path) as f, FeatureFile(whole) as g:
        assert f.ids("train").tolist() == g.ids("train").tolist()
        np.testing.assert_allclose(f.read("train")[0], g.read("train")[0], atol=1e-3)


def test_unknown_cut_is_a_clear_error(tmp_path):
    images = Images(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cut='9' is not a place .* \['0', '1', '2', '3'\]"):
        extract(images, cut_backbone(), tmp_path / "f.h5", cut="9", verbose=False)
    assert not (tmp_path / "f.h5").exists()


def test_top_with_zero_steps_is_the_frozen_model():
    X, y = activations(300)
    top = small_top()
    frozen_top = clone(TopStage(top=top, epochs=0, validation_fraction=0))
    clf = BalancedSoftmaxClassifier(head=frozen_top, random_state=0).fit(X, y)
    with torch.no_grad():
        E = top(torch.from_numpy(X)).numpy()
    frozen = BalancedSoftmaxClassifier(calibration_cv=None, random_state=0).fit(E, y)
    np.testing.assert_array_equal(clf.predict(X), frozen.predict(E))
    np.testing.assert_allclose(clf.decision_function(X), frozen.decision_function(E), atol=1e-4)


def test_training_the_top_beats_the_frozen_top_and_round_trips():
    X, y = activations(2000)
    X_test, y_test = activations(1000, seed=1)
    keep = long_tailed_subset(y, 10, random_state=0)
    frozen = BalancedSoftmaxClassifier(head=TopStage(top=small_top(), epochs=0), random_state=0)
    trained = BalancedSoftmaxClassifier(
        head=TopStage(top=small_top(), epochs=6, lr=3e-3), random_state=0
    )
    frozen.fit(X[keep], y[keep])
    trained.fit(X[keep], y[keep])
    assert trained.best_epoch_ > 0
    assert len(trained.validation_scores_) == 7
    # Balanced accuracy on held-out rows, the probe's first: fine-tuning gained.
    assert max(trained.validation_scores_[1:]) > trained.validation_scores_[0]
    assert trained.best_validation_score_ == trained.validation_scores_[trained.best_epoch_]
    assert trained.score(X_test, y_test) > frozen.score(X_test, y_test) + 0.04
    again = pickle.loads(pickle.dumps(trained))
    np.testing.assert_array_equal(again.predict(X_test), trained.predict(X_test))
    assert clone(trained).get_params()["head__epochs"] == 6


def test_without_held_out_rows_the_last_epoch_is_kept_and_reported():
    X, y = activations(300)
    stage = TopStage(top=small_top(), epochs=3, lr=3e-3, validation_fraction=0)
    clf = BalancedSoftmaxClassifier(head=stage, random_state=0).fit(X, y)
    assert clf.best_epoch_ == 3 and clf.validation_scores_ is None
    mixed = BalancedSoftmaxClassifier(head=clone(stage).set_params(mixup=0.4), random_state=0)
    assert mixed.fit(X, y).score(X, y) > 0.5  # four classes
    # The top trained on mixed maps: same seed, other weights.
    first = [next(m.module_.head.tops[0].parameters()).detach() for m in (clf, mixed)]
    assert float((first[0] - first[1]).abs().max()) > 1e-4


def test_wrong_activation_shapes_are_clear_errors():
    X, y = activations(120)
    clf = BalancedSoftmaxClassifier(head=TopStage(top=small_top(), epochs=0), random_state=0)
    with pytest.raises(
        ValueError, match=r"activations cached at a cut.*got X of shape \(120, 36\)"
    ):
        clf.fit(X.reshape(120, -1), y)
    with pytest.raises(ValueError, match=r"Rows of shape \(3, 3, 3\) do not fit the top"):
        clf.fit(X[:, :3], y)
    clf.fit(X, y)
    with pytest.raises(ValueError, match=r"rows of shape \(36,\).*fitted on activations of shape"):
        clf.predict(X.reshape(120, -1))


def cut_file(path, X, y, chunk_rows=16):
    """A file of activations as extract(..., cut=...) writes them: flat rows and their shape."""
    with FeatureWriter(
        path, classes=list("abcd"), mode="w", dtype="float32", chunk_rows=chunk_rows
    ) as writer:
        writer.set_row_shape("train", X.shape[1:])
        writer.append("train", X.reshape(len(X), -1), y)
    return path


def test_streamed_activations_train_the_top_block_by_block(tmp_path):
    X, y = activations(2000)
    X_test, y_test = activations(1000, seed=1)
    path = cut_file(tmp_path / "cut.h5", X, y)
    with FeatureFile(path) as f:
        # 125 chunks of 16 rows, read 8 chunks at a time in a shuffled order.
        split = FeatureSplit(f, "train", block_chunks=8)
        assert split.shape == (2000, 4, 3, 3)
        rows = np.array([1500, 3, 17, 16, 1999])
        np.testing.assert_array_equal(split.take(rows), X[rows])
        for train in ("all", "last"):
            stage = TopStage(top=two_layer_top(), epochs=4, lr=3e-3, train=train)
            frozen = clone(stage).set_params(epochs=0)
            base = BalancedSoftmaxClassifier(random_state=0)
            in_memory = clone(base).set_params(head=stage).fit(X, y)
            streamed = clone(base).set_params(head=stage).fit(split)
            probe = clone(base).set_params(head=frozen).fit(split)
            # The streamed fine-tuning gains what the in-memory one gains.
            assert streamed.score(X_test, y_test) > probe.score(X_test, y_test) + 0.04
            assert abs(streamed.score(X_test, y_test) - in_memory.score(X_test, y_test)) < 0.02
            assert len(streamed.validation_scores_) == 5
            assert streamed.row_shape_ == (4, 3, 3) and streamed.n_features_in_ == 4
        np.testing.assert_array_equal(streamed.predict(split), streamed.predict(X))
        # A later stage (SADE's aggregation, RIDE's router) reads the top's embeddings of
        # the streamed rows.
        ride = RIDEClassifier(
            head=TopStage(top=two_layer_top(), epochs=2, lr=3e-3), random_state=0
        ).fit(split)
        assert ride.score(X_test, y_test) > 0.8


def test_streamed_files_must_match_the_head(tmp_path):
    X, y = activations(50)
    path = cut_file(tmp_path / "cut.h5", X, y)
    embeddings = tmp_path / "emb.h5"
    write_features(embeddings, {"train": (X.mean(axis=(2, 3)), y)}, classes=list("abcd"))
    with FeatureFile(path) as f, pytest.raises(ValueError, match="head=TopStage"):
        BalancedSoftmaxClassifier().fit(f["train"])
    top = BalancedSoftmaxClassifier(head=TopStage(top=small_top(), epochs=0))
    with FeatureFile(embeddings) as f, pytest.raises(ValueError, match="holds embeddings"):
        top.fit(f["train"])


def test_sade_experts_own_their_tops():
    X, y = activations(800)
    keep = long_tailed_subset(y, 10, random_state=0)
    top = two_layer_top()
    for experts in ("all", "head"):
        clf = SADEClassifier(
            head=TopStage(top=top, epochs=2, experts=experts, train="all"), random_state=0
        ).fit(X[keep], y[keep])
        module = clf.module_.head
        assert len(module.tops) == 3
        shared = list(module.shared.parameters())
        assert (len(shared) > 0) == (experts == "head")
        assert clf.expert_decision_function(X[:5]).shape == (3, 5, 4)
        assert clf.score(X, y) > 0.5


def test_cosine_experts_with_their_own_tops_end_different_linear_ones_cannot():
    """A linear expert's bias absorbs the offset by which the experts' losses differ, so
    tops started alike train alike; cosine experts have no bias to absorb it."""
    X, y = activations(600)
    keep = long_tailed_subset(y, 20, random_state=0)
    top = torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    gaps = {}
    for expert_head in ("linear", "cosine"):
        clf = SADEClassifier(
            head=TopStage(top=top, epochs=2, lr=3e-3, validation_fraction=0),
            expert_head=expert_head,
            max_epochs=5,
            random_state=0,
        ).fit(X[keep], y[keep])
        first = [next(t.parameters()).detach() for t in clf.module_.head.tops]
        gaps[expert_head] = max(float((first[0] - w).abs().max()) for w in first[1:])
    assert gaps["linear"] < 1e-5
    assert gaps["cosine"] > 1e-2


def test_ride_experts_own_their_tops_and_the_router_reads_them():
    X, y = activations(800)
    keep = long_tailed_subset(y, 10, random_state=0)
    clf = RIDEClassifier(
        head=TopStage(top=two_layer_top(), epochs=2, lr=3e-3, validation_fraction=0),
        router_threshold=0.2,
        random_state=0,
    ).fit(X[keep], y[keep])
    module = clf.module_.head
    assert len(module.tops) == 3
    # Experts start from different random heads, so their own tops train apart.
    first = [next(t.parameters()).detach() for t in module.tops]
    assert max(float((first[0] - w).abs().max()) for w in first[1:]) > 1e-3
    assert type(module.head).__name__ == "RoutedExperts" and len(clf.router_history_) == 5
    # The router decides how many experts each row uses, from its own embeddings.
    assert np.all(clf.set_params(router_threshold=0.0).n_experts_used(X) == 3)
    assert np.all(clf.set_params(router_threshold=1.0).n_experts_used(X) == 1)
    clf.set_params(router_threshold=0.2)
    assert clf.score(X, y) > 0.5
    reloaded = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(reloaded.predict_proba(X[:5]), clf.predict_proba(X[:5]), atol=1e-6)
    with pytest.raises(ValueError, match="rows of shape"):
        clf.predict(X[:, :3])


def test_prl_trains_a_shared_top_that_every_preference_reads():
    X, y = activations(2000)
    X_test, y_test = activations(1000, seed=1)
    keep = long_tailed_subset(y, 10, random_state=0)
    frozen = PRLClassifier(head=TopStage(top=small_top(), epochs=0), random_state=0)
    trained = PRLClassifier(head=TopStage(top=small_top(), epochs=6, lr=3e-3), random_state=0)
    frozen.fit(X[keep], y[keep])
    trained.fit(X[keep], y[keep])
    # The fine-tuned top gains what it gains under BalancedSoftmax's loss.
    assert trained.score(X_test, y_test) > frozen.score(X_test, y_test) + 0.04
    assert trained.best_epoch_ > 0 and len(trained.module_.head.tops) == 1
    # Preferences steer the head over the one trained top, without refitting.
    head_first = np.mean(trained.predict(X_test, preference="forward") == 0)
    tail_first = np.mean(trained.predict(X_test, preference="backward") == 0)
    assert head_first > tail_first
    many = trained.decision_function_many(X_test[:5], ["forward", "uniform"])
    np.testing.assert_allclose(
        many[1], trained.decision_function(X_test[:5], preference="uniform"), atol=1e-5
    )
    # adapt() reads the top's uniform corner and steers to a test set's prior.
    shifted = np.concatenate([np.flatnonzero(y_test == 0)] * 4 + [np.arange(100)])
    adapted = pickle.loads(pickle.dumps(trained)).adapt(X_test[shifted])
    assert adapted.shift_detected_ and adapted.test_prior_[0] > 0.5
    assert adapted.score(X_test[shifted], y_test[shifted]) >= trained.score(
        X_test[shifted], y_test[shifted]
    )
    with pytest.raises(ValueError, match="rows of shape"):
        trained.predict(X_test[:, :3])


def test_prl_preferences_modulate_the_top_they_read():
    X, y = activations(2000)
    X_test, _ = activations(300, seed=1)
    keep = long_tailed_subset(y, 10, random_state=0)

    def prl(modulate_top, epochs):
        stage = TopStage(top=small_top(), epochs=epochs, lr=3e-3)
        return PRLClassifier(head=stage, modulate_top=modulate_top, random_state=0).fit(
            X[keep], y[keep]
        )

    # The modulation starts as the identity: before fine-tuning nothing differs.
    np.testing.assert_allclose(
        prl(True, 0).decision_function_many(X_test, ["forward", "backward"]),
        prl(False, 0).decision_function_many(X_test, ["forward", "backward"]),
        atol=1e-5,
    )
    shared, modulated = prl(False, 6), prl(True, 6)
    assert shared.module_.head.modulation is None
    # Each corner reads embeddings of its own after fine-tuning; a shared top gives one.
    corners = torch.eye(3)
    with torch.no_grad():
        z = modulated.module_.head.embed(torch.as_tensor(X_test), corners)
    assert z.shape == (3, 300, 8)
    assert float((z[0] - z[2]).abs().max()) > 1e-3
    # Every way to predict reads the same preference-specific embeddings.
    many = modulated.decision_function_many(X_test, ["forward", [0.2, 0.5, 0.3]])
    for scores, preference in zip(many, ["forward", [0.2, 0.5, 0.3]], strict=True):
        np.testing.assert_allclose(
            scores, modulated.decision_function(X_test, preference=preference), atol=1e-5
        )
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(modulated)).predict(X_test, preference="backward"),
        modulated.predict(X_test, preference="backward"),
    )


def test_efficientnet_top_is_modulated_before_its_head_activation():
    pytest.importorskip("efficientnet_lite_pytorch")
    shared, tops, n_features = TopStage(train="all").build((192, 7, 7), modulated=True)
    (top,) = tops
    assert top.channels == 1280 and isinstance(top.after[0], torch.nn.ReLU6)
    maps = torch.randn(2, 192, 7, 7)
    plain = TopStage(train="all").build((192, 7, 7))[1][0]
    scale, shift = torch.zeros(3, 1280), torch.zeros(3, 1280)
    shift[2] = -1e4  # every channel below ReLU6's threshold: a zero embedding
    with torch.no_grad():
        out = top(shared(maps), scale, shift).view(3, 2, n_features)
        torch.testing.assert_close(out[0], plain(maps), atol=1e-5, rtol=1e-5)
    assert float(out[2].abs().max()) == 0.0


def test_command_line_extracts_efficientnet_activations_at_a_cut(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    from PIL import Image

    from ltlearn.cli import main

    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (tmp_path / "images" / c).mkdir(parents=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / c / "0.png")
    out = tmp_path / "cut.h5"
    args = ["extract", str(tmp_path / "images"), str(out), "--cut", "model._blocks.14"]
    assert main([*args, "--engine", "torch", "--quiet"]) == 0
    with FeatureFile(out) as f:
        X, y = f.read("train")
        assert f.attrs["cut"] == "model._blocks.14"
    assert X.shape == (2, 192, 7, 7) and y.tolist() == [0, 1]
    assert main(["extract", str(tmp_path / "images"), str(out), "--cut", "nowhere"]) != 0
    assert "cut='nowhere' is not a place" in capsys.readouterr().err


def test_training_only_the_last_part_leaves_the_rest_as_it_was():
    X, y = activations(800)
    top = two_layer_top()
    clf = BalancedSoftmaxClassifier(
        head=TopStage(top=top, train="last", epochs=2, lr=3e-3, validation_fraction=0),
        random_state=0,
    ).fit(X, y)
    module = clf.module_.head
    frozen, last = module.shared, module.tops[0]
    torch.testing.assert_close(frozen[0].weight, top[0].weight)
    assert float((last[0].weight - top[2].weight).detach().abs().max()) > 1e-3
    # Predictions run the frozen part too, on the raw activations.
    with torch.no_grad():
        expected = module.head(module.normalizer(last(frozen(torch.from_numpy(X[:5])))))
    np.testing.assert_allclose(clf.decision_function(X[:5]), expected.numpy(), rtol=1e-5)


def test_views_of_the_maps_join_the_training_of_the_top():
    # On few rows, training on the views generalises better than on the rows alone.
    X, y, V, X_test, y_test = few_maps_with_views()
    stage = TopStage(top=two_layer_top(), epochs=20, lr=1e-2, validation_fraction=0)
    plain = BalancedSoftmaxClassifier(head=stage, random_state=0).fit(X, y)
    viewed = BalancedSoftmaxClassifier(head=clone(stage), random_state=0).fit(X, y, views=V)
    assert viewed.score(X_test, y_test) > plain.score(X_test, y_test) + 0.03  # 0.81 -> 0.855
    # Trained whole, the top reads the views' maps themselves: other weights.
    whole = clone(stage).set_params(top=small_top(), train="all")
    tops = [
        BalancedSoftmaxClassifier(head=whole, random_state=0)
        .fit(X, y, views=views)
        .module_.head.tops[0][0]
        .weight.detach()
        for views in (None, V)
    ]
    assert float((tops[0] - tops[1]).abs().max()) > 1e-3
    # With rows held out, each training row still gets its own views: views of other
    # rows (mislabelled maps) cost far more than they could gain (0.80 against 0.63).
    held_out = clone(stage).set_params(validation_fraction=0.25)
    own, others = (
        BalancedSoftmaxClassifier(head=clone(held_out), random_state=0)
        .fit(X, y, views=views)
        .score(X_test, y_test)
        for views in (V, V[np.random.RandomState(5).permutation(60)])
    )
    assert own > others + 0.1
    # Test-time views average the maps' scores, as for embeddings.
    scores = [viewed.decision_function(x) for x in (X, V[:, 0], V[:, 1], V[:, 2])]
    np.testing.assert_allclose(
        viewed.decision_function(X, views=V), np.mean(scores, axis=0), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(
        ValueError, match=r"views passed to fit must have shape \(60, n_views, 4, 3, 3\)"
    ):
        viewed.fit(X, y, views=V.reshape(60, 3, -1))


def test_sade_experts_tops_train_on_the_maps_views():
    # As for one top: each expert's own top reads the views' maps, and on few rows that
    # generalises better (0.82 -> 0.88 here; on CIFAR-10-LT, SADE's most accurate setting).
    X, y, V, X_test, y_test = few_maps_with_views()
    stage = TopStage(
        top=two_layer_top(), train="all", experts="all", epochs=20, lr=1e-2, validation_fraction=0
    )
    plain, viewed = (
        SADEClassifier(head=clone(stage), expert_head="cosine", random_state=0).fit(
            X, y, views=views
        )
        for views in (None, V)
    )
    assert viewed.score(X_test, y_test) > plain.score(X_test, y_test) + 0.03
    weights = [next(t.parameters()).detach() for t in viewed.module_.head.tops]
    assert max(float((weights[0] - w).abs().max()) for w in weights[1:]) > 1e-3


def test_ride_experts_tops_train_on_the_maps_views_and_the_router_on_the_plain_rows():
    # RIDE refuses views of embeddings (its router's stage revisits plain rows); with
    # tops, the views train the tops and the router reads the plain rows through them.
    X, y, V, X_test, y_test = few_maps_with_views()
    stage = TopStage(
        top=two_layer_top(), train="all", experts="all", epochs=20, lr=1e-2, validation_fraction=0
    )
    plain, viewed = (
        RIDEClassifier(head=clone(stage), random_state=0).fit(X, y, views=views)
        for views in (None, V)
    )
    assert viewed.score(X_test, y_test) > plain.score(X_test, y_test) + 0.03  # 0.78 -> 0.86
    assert len(viewed.router_history_) > 0


def test_views_of_a_cut_file_come_back_in_the_maps_shape(tmp_path):
    images = Images(torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1]))
    backbone = cut_backbone()
    path = extract(
        images,
        backbone,
        tmp_path / "cut.h5",
        cut="1",
        views=2,
        view_transform=lambda image: image.flip(-1),  # a mirror image
        engine="torch",
        verbose=False,
    )
    with FeatureFile(path) as f:
        X, y, V = f.read_with_views("train")
    assert X.shape == (5, 4, 6, 6) and V.shape == (5, 2, 4, 6, 6)
    trunk, _ = backbone.split("1")
    with torch.no_grad():
        mirrored = trunk(images.tensors[0].flip(-1)).numpy()
    np.testing.assert_allclose(V[:, 1], mirrored, atol=2e-3)  # float16 storage


def fitted_without_and_with_recalibration(estimator, monkeypatch):
    """``estimator`` with a top fitted twice on a long-tailed maps problem, without then with
    recalibration, and the test maps. This top's held-out offsets shrink to zero; given ones
    check how they are applied."""
    X, y = activations(2000)
    X_test, _ = activations(300, seed=1)
    keep = long_tailed_subset(y, 10, random_state=0)
    fitted = TorchHeadClassifier._held_out_calibration

    def with_offsets(self, *args):
        T, b, covariance, confusion = fitted(self, *args)
        return T, b + np.array([0.3, -0.2, 0.1, 0.0]), covariance, confusion

    monkeypatch.setattr(TorchHeadClassifier, "_held_out_calibration", with_offsets)
    stage = TopStage(top=small_top(), epochs=4, lr=3e-3)
    plain, fixed = (
        clone(estimator)
        .set_params(head=clone(stage).set_params(recalibrate=on))
        .fit(X[keep], y[keep])
        for on in (False, True)
    )
    return plain, fixed, X_test


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_recalibration_applies_the_held_out_temperature_and_offsets(tau, monkeypatch):
    plain, fixed, X_test = fitted_without_and_with_recalibration(
        BalancedSoftmaxClassifier(tau=tau, random_state=0), monkeypatch
    )
    T, b = plain.calibration_temperature_, plain.calibration_bias_
    assert abs(T - 1.0) > 0.05
    # The same fit, its balanced logits calibrated on the held-out rows.
    expected = plain._balanced_logits(X_test) / T + b
    np.testing.assert_allclose(fixed._balanced_logits(X_test), expected, rtol=1e-4, atol=1e-4)
    # Predictions keep the share 1 - tau of the log prior: raw = balanced + (1 - tau) log p.
    raw = expected + (1.0 - tau) * np.log(fixed.class_prior_)
    np.testing.assert_allclose(fixed.decision_function(X_test), raw, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fixed.predict(X_test), raw.argmax(axis=1))
    # The correction is inside the model: nothing left for adaptation to apply twice.
    assert fixed.calibration_temperature_ == 1.0 and not fixed.calibration_bias_.any()
    np.testing.assert_array_equal(
        fixed.calibration_bias_covariance_, plain.calibration_bias_covariance_
    )
    again = pickle.loads(pickle.dumps(fixed))
    np.testing.assert_array_equal(again.decision_function(X_test), fixed.decision_function(X_test))


def test_prl_recalibration_corrects_every_preference_balanced_logits(monkeypatch):
    plain, fixed, X_test = fitted_without_and_with_recalibration(
        PRLClassifier(random_state=0), monkeypatch
    )
    T, b = plain.calibration_temperature_, plain.calibration_bias_
    assert abs(T - 1.0) > 0.05
    basis = plain._network().shift_basis.numpy()
    for preference, r_hat in [("uniform", [0, 1, 0]), ("forward", [1, 0, 0])]:
        # What the preference stands for (r_hat @ S) stays; the rest is calibrated.
        offsets = np.asarray(r_hat, dtype=np.float32) @ basis
        raw = plain.decision_function(X_test, preference=preference)
        np.testing.assert_allclose(
            fixed.decision_function(X_test, preference=preference),
            (raw - offsets) / T + b + offsets,
            rtol=1e-4,
            atol=1e-4,
        )
    assert fixed.calibration_temperature_ == 1.0 and not fixed.calibration_bias_.any()
    np.testing.assert_allclose(fixed.r_, plain.r_)
    again = pickle.loads(pickle.dumps(fixed))
    np.testing.assert_array_equal(
        again.decision_function(X_test, preference="backward"),
        fixed.decision_function(X_test, preference="backward"),
    )


def test_recalibration_needs_held_out_rows_and_spares_experts():
    X, y = activations(400)
    stage = TopStage(top=small_top(), epochs=1, lr=3e-3, validation_fraction=0)
    clf = BalancedSoftmaxClassifier(head=stage, random_state=0).fit(X, y)
    assert not isinstance(clf.module_.head.head, _Recalibrated)
    sade = SADEClassifier(head=TopStage(top=small_top(), epochs=1), random_state=0).fit(X, y)
    assert not isinstance(sade.module_.head.head, _Recalibrated)
