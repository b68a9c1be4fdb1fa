"""LDAM-DRW, RIDE and the decoupled classifiers: losses by hand, routing, re-balancing."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ltlearn import (
    BalancedSoftmaxClassifier,
    DecoupledClassifier,
    RIDEClassifier,
    SHIKEClassifier,
)
from ltlearn.decoupled import ScaledHead, TauNormalizedHead
from ltlearn.heads import GroupedL2Normalizer
from ltlearn.losses import (
    LDAMLoss,
    LogitAdjustedLoss,
    RIDELoss,
    SHIKELoss,
    effective_number_weights,
)

FAST = dict(device="cpu", random_state=0)


def test_ldam_margins_and_deferred_reweighting_by_hand():
    counts = [625, 16]  # margins proportional to 1/5 and 1/2
    loss = LDAMLoss(counts, max_margin=0.5, scale=2.0, drw_start=0.5, n_steps=4, beta=0.9)
    np.testing.assert_allclose(loss.margins.numpy(), [0.2, 0.5], rtol=1e-6)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])

    def ce(z, k):
        return float(np.log(np.exp(z).sum()) - z[k])

    first = ce(np.array([1.0 - 2 * 0.2, 0.0]), 0)  # the target logit lowered by scale * margin
    second = ce(np.array([0.0, 1.0 - 2 * 0.5]), 1)
    for _ in range(2):  # the first half of the steps: no re-weighting
        assert loss(logits, target).item() == pytest.approx((first + second) / 2, rel=1e-6)
    w = effective_number_weights(counts, beta=0.9).numpy()
    expected = (w[0] * first + w[1] * second) / (w[0] + w[1])
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # Effective numbers: (1 - beta) / (1 - beta ** n), scaled to mean one.
    raw = 0.1 / (1 - 0.9 ** np.array(counts, dtype=float))
    np.testing.assert_allclose(w, raw * 2 / raw.sum(), rtol=1e-5)


def test_ride_diversity_term_by_hand():
    prior = torch.tensor([0.8, 0.2])
    base = LogitAdjustedLoss(prior, tau=0.0)
    # drw_start=0: the per-class temperatures from the first step on.
    loss = RIDELoss(
        base, prior, diversity=-0.2, temperature=1.0, reweight_factor=0.5, drw_start=0, n_steps=1
    )
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # 2 experts, 1 sample
    target = torch.tensor([0])
    # Per-class temperatures: C p r + 1 - r = (1.3, 0.7), scaled to a largest of one.
    t = torch.tensor([1.0, 0.7 / 1.3])
    mean = F.softmax(logits.mean(dim=0) / t, dim=-1)
    expected = sum(F.cross_entropy(z, target) for z in logits).item()
    for z in logits:
        kl = (mean * (mean.log() - F.log_softmax(z / t, dim=-1))).sum().item()
        expected += -0.2 * t.mean().item() ** 2 * kl
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # The paper's sign: experts that disagree lower the loss below their base losses.
    assert loss(logits, target).item() < sum(F.cross_entropy(z, target) for z in logits).item()


def test_tau_zero_is_the_unnormalised_classifier_and_lws_starts_there():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3, bias=False)
    z = torch.randn(7, 5)
    torch.testing.assert_close(TauNormalizedHead(head, 0.0)(z), head(z))
    torch.testing.assert_close(ScaledHead(head)(z), head(z))
    unit = TauNormalizedHead(head, 1.0)
    torch.testing.assert_close(
        torch.linalg.vector_norm(unit.weight, dim=1), torch.ones(3), rtol=1e-6, atol=1e-6
    )


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 16))
    means *= 1.6 / np.linalg.norm(means, axis=1, keepdims=True)

    def draw(counts):
        y = np.repeat(np.arange(4), counts)
        return means[y] + rng.normal(size=(len(y), 16)), y

    return draw


def test_router_threshold_trades_experts_for_nothing_else(blobs):
    """0 calls every expert, 1 only the first; between, predictions use what the router chose."""
    X, y = blobs([1000, 300, 100, 30])
    model = RIDEClassifier(adapter_size=16, **FAST).fit(X, y)
    X_test, _ = blobs([300] * 4)
    every = model.set_params(router_threshold=0.0)
    assert every.n_experts_used(X_test).min() == 3
    experts = every.module_.head.network(
        every.module_.normalizer(torch.as_tensor(X_test, dtype=torch.float32))
    ).detach()
    np.testing.assert_allclose(every.decision_function(X_test), experts.mean(0).numpy(), atol=1e-5)
    first = model.set_params(router_threshold=1.0)
    assert first.n_experts_used(X_test).max() == 1
    np.testing.assert_allclose(first.decision_function(X_test), experts[0].numpy(), atol=1e-5)
    assert len(model.router_history_) > 0


def test_router_sends_tail_samples_on_more_often_than_head_samples():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 16))
    means *= 1.6 / np.linalg.norm(means, axis=1, keepdims=True)

    def draw(counts):
        y = np.repeat(np.arange(4), counts)
        return means[y] + rng.normal(size=(len(y), 16)), y

    X, y = draw([1000, 300, 100, 30])
    X_test, y_test = draw([300] * 4)
    model = RIDEClassifier(adapter_size=16, router_threshold=0.1, device="cpu", random_state=1)
    used = model.fit(X, y).n_experts_used(X_test)
    # The head class is classified right more often by the first expert: fewer experts.
    assert 1.0 < used.mean() < 3.0
    assert used[y_test == 0].mean() < used[y_test == 3].mean() - 0.2


@pytest.mark.parametrize("method", ["crt", "tau_norm", "lws"])
def test_decoupled_methods_favour_the_tail_more_than_plain_cross_entropy(blobs, method):
    X, y = blobs([1000, 300, 100, 30])
    X_test, y_test = blobs([300] * 4)
    model = DecoupledClassifier(method, **FAST).fit(X, y)
    stage_one = TauNormalizedHead(model.module_.head, 0.0) if method != "crt" else None
    assert np.mean(model.predict(X_test) == y_test) > 0.5
    if method == "tau_norm":
        assert 0.0 <= model.tau_ <= 2.0
    if stage_one is not None and method == "lws":
        assert (
            model.module_.head.scale.detach().numpy()[3]
            > model.module_.head.scale.detach().numpy()[0]
        )


def test_ldam_drw_option_of_ride(blobs):
    X, y = blobs([1000, 300, 100, 30])
    model = RIDEClassifier(loss="ldam_drw", n_experts=2, **FAST).fit(X, y)
    assert model.criterion_.base.reweight_from is not None
    X_test, y_test = blobs([300] * 4)
    assert np.mean(model.predict(X_test) == y_test) > 0.5


def test_shike_hardest_negative_and_distillation_by_hand():
    # 2 experts, 1 sample of class 0, 4 classes.
    logits = torch.tensor([[[3.0, 2.0, 0.0, 1.0]], [[1.0, 0.0, 2.0, 1.5]]])
    target = torch.tensor([0])
    # Mean logits of the non-targets: 1.0, 1.0, 1.25 -> class 3 is the hardest negative.
    # The teacher: the largest expert logit (2.0 for class 1, 2.0 for class 2), but the
    # mean (1.25) at class 3, and nothing at the target.
    teacher = SHIKELoss.teacher_logits(logits, target)
    np.testing.assert_allclose(teacher[0, 1:].numpy(), [2.0, 2.0, 1.25])
    q = np.exp([2.0, 2.0, 1.25]) / np.exp([2.0, 2.0, 1.25]).sum()

    def non_target(z):
        p = np.exp(z[1:]) / np.exp(z[1:]).sum()
        return p

    def kl(a, b):
        return float((a * np.log(a / b)).sum())

    z = logits[:, 0].numpy()
    p = [np.exp(e) / np.exp(e).sum() for e in z]
    ce = sum(-np.log(pi[0]) for pi in p)
    transfer = sum(kl(q, non_target(e)) for e in z)
    distillation = kl(p[1], p[0]) + kl(p[0], p[1])
    base = LogitAdjustedLoss(torch.full((4,), 0.25), tau=0.0)
    loss = SHIKELoss(base, distillation=0.3, transfer=2.0)
    expected = ce + 0.3 * distillation + 2.0 * transfer
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # The teacher holds still: gradients reach each expert only through its own terms.
    logits.requires_grad_(True)
    SHIKELoss(base, distillation=0.0, transfer=1.0)(logits, target).backward()
    assert torch.all(logits.grad[:, 0, 0] < 0)  # the target pushed up in both experts


def test_grouped_l2_normalises_each_group():
    x = torch.tensor([[3.0, 4.0, 1e6, 0.0, 0.0]])
    out = GroupedL2Normalizer([2, 3])(x)
    np.testing.assert_allclose(out[0, :2].norm().item(), np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(out[0, 2:].numpy(), [np.sqrt(3), 0.0, 0.0], rtol=1e-6)


def test_shike_fuses_depths_and_rebalances(blobs):
    X, y = blobs([1000, 300, 100, 30])
    X_test, y_test = blobs([300] * 4)
    rng = np.random.default_rng(1)
    # A "shallow" layer: a noisy copy of the class signal, 8 columns.
    shallow, shallow_test = (rng.normal(size=(len(a), 8)) + a[:, :8] for a in (X, X_test))
    Xd, Xd_test = np.hstack([shallow, X]), np.hstack([shallow_test, X_test])
    groups = [("layer", 8), ("embedding", 16)]
    model = SHIKEClassifier(feature_groups=groups, adapter_size=8, **FAST).fit(Xd, y)
    assert model.feature_widths_ == [8, 16]
    predicted = model.predict(Xd_test)
    assert np.mean(predicted == y_test) > 0.65  # chance: 0.25; Balanced Softmax: 0.74
    # Re-balanced: the rarest class is found far more often than plain cross-entropy finds it.
    plain = BalancedSoftmaxClassifier(tau=0.0, **FAST).fit(Xd, y).predict(Xd_test)
    assert np.mean(predicted[y_test == 3] == 3) > np.mean(plain[y_test == 3] == 3) + 0.2
    # Predictions are the mean of the re-trained experts' logits.
    heads = model.module_.head.experts
    Z = model.module_.normalizer(torch.as_tensor(Xd_test, dtype=torch.float32))
    np.testing.assert_allclose(
        model.decision_function(Xd_test), heads(Z).mean(0).detach().numpy(), atol=1e-5
    )
    assert len(model.second_stage_history_) > 0
    with pytest.raises(ValueError, match="adding up to 20; X has 24 features"):
        SHIKEClassifier(feature_groups=[4, 16], **FAST).fit(Xd, y)
    with pytest.raises(ValueError, match="widths or \\(name, width\\) pairs"):
        SHIKEClassifier(feature_groups=["a", "b"], **FAST).fit(Xd, y)
