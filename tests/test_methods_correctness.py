"""The methods against their papers and reference code, and their errors (issue 27)."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ltlearn import DecoupledClassifier, RIDEClassifier, SHIKEClassifier
from ltlearn.losses import LDAMLoss, LogitAdjustedLoss, RIDELoss

FAST = dict(device="cpu", random_state=0)


def _blobs(counts, seed=0, n_features=8):
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.normal(size=(len(counts), n_features))
    y = np.repeat(np.arange(len(counts)), counts)
    return means[y] + rng.normal(size=(len(y), n_features)), y


def test_ride_ldam_drw_counts_each_optimizer_step_once():
    # 200 rows in batches of 50 for 5 epochs: 20 optimizer steps, whatever n_experts.
    X, y = _blobs([120, 50, 30])
    model = RIDEClassifier(
        loss="ldam_drw", n_experts=3, max_epochs=5, batch_size=50, adapter_size=None, **FAST
    ).fit(X, y)
    ldam = model.criterion_.base
    assert ldam.steps == 20
    assert model.criterion_.steps == 20
    # Re-weighting starts after 80 % of the steps: 16, not 16 / 3 expert calls.
    assert ldam.reweight_from == 16


def test_ride_loss_advances_ldam_once_per_call_and_reweights_on_schedule():
    counts = [90, 9, 1]
    prior = torch.tensor(counts, dtype=torch.float32) / 100
    ldam = LDAMLoss(counts, scale=1.0, drw_start=0.5, n_steps=4)
    # A negligible diversity weight: the experts' own losses, each its own logits.
    loss = RIDELoss(ldam, prior, diversity=-1e-9)
    logits = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([2, 0, 1, 0])

    def expert_losses(class_weights):
        total = 0.0
        for z in logits:
            ce = F.cross_entropy(z - ldam.margins * F.one_hot(target, 3), target, reduction="none")
            w = class_weights[target]
            total += ((w * ce).sum() / w.sum()).item()
        return total

    for step in range(1, 5):
        value = loss(logits, target).item()
        assert ldam.steps == step
        # Re-weighted after half of the 4 steps, as LDAM-DRW alone would be.
        weights = ldam.class_weights if step > 2 else torch.ones(3)
        assert value == pytest.approx(expert_losses(weights), rel=1e-5)


def test_ride_per_class_temperature_starts_with_reweighting():
    prior = torch.tensor([0.8, 0.2])
    base = LogitAdjustedLoss(prior, tau=0.0)
    loss = RIDELoss(
        base, prior, diversity=-0.5, temperature=2.0, reweight_factor=0.5, drw_start=0.5, n_steps=4
    )
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
    target = torch.tensor([0])

    def expected(t):
        mean = F.softmax(logits.mean(dim=0) / t, dim=-1)
        total = sum(F.cross_entropy(z, target) for z in logits).item()
        for z in logits:
            kl = (mean * (mean.log() - F.log_softmax(z / t, dim=-1))).sum().item()
            total += -0.5 * float(torch.as_tensor(t).mean()) ** 2 * kl
        return total

    # C p r + 1 - r = (1.3, 0.7), scaled to a largest of one, times the temperature.
    per_class = 2.0 * torch.tensor([1.0, 0.7 / 1.3])
    values = [loss(logits, target).item() for _ in range(4)]
    assert values[0] == pytest.approx(expected(2.0), rel=1e-5)
    assert values[1] == pytest.approx(expected(2.0), rel=1e-5)
    assert values[2] == pytest.approx(expected(per_class), rel=1e-5)
    assert values[3] == pytest.approx(expected(per_class), rel=1e-5)


def test_ride_without_diversity_trains_each_experts_own_loss():
    prior = torch.tensor([0.5, 0.3, 0.2])
    base = LogitAdjustedLoss(prior)
    logits = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 0, 1])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    loss = RIDELoss(base, prior, diversity=0.0)(logits, target, weight)
    # Not the reference code's base loss of the mean logits (see RIDELoss): each expert its own.
    expected = sum(base(z, target, weight) for z in logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(3 * base(logits.mean(0), target, weight).item(), rel=1e-3)


def test_ride_diverse_experts_sum_their_own_losses_with_sample_weights():
    prior = torch.tensor([0.5, 0.3, 0.2])
    base = LogitAdjustedLoss(prior)
    logits = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 0, 1])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    loss = RIDELoss(base, prior, diversity=-1e-9)(logits, target, weight)
    expected = sum(base(z, target, weight) for z in logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_tau_norm_auto_with_one_row_per_class_is_a_clear_error():
    X, y = _blobs([1, 1, 1, 1])
    with pytest.raises(ValueError, match="single training row.*Pass tau explicitly"):
        DecoupledClassifier("tau_norm", max_epochs=2, **FAST).fit(X, y)
    # The fixes the message names work.
    DecoupledClassifier("tau_norm", tau=1.0, max_epochs=2, **FAST).fit(X, y)
    DecoupledClassifier("lws", max_epochs=2, **FAST).fit(X, y)


def test_shike_refuses_oversized_fusion_before_training():
    # feature_groups=None at d = 4,000: a 4,000 x 4,000 layer per expert, 48 M weights.
    X, y = _blobs([3, 3], n_features=4000)
    with pytest.raises(ValueError, match="48,000,000 weights.*feature_groups=None"):
        SHIKEClassifier(**FAST).fit(X, y)
    # Narrow shallow layers beside the same embedding are small enough.
    rng = np.random.default_rng(0)
    Xd = np.hstack([rng.normal(size=(len(X), 4)), X])
    model = SHIKEClassifier(feature_groups=[4, 4000], max_epochs=1, **FAST).fit(Xd, y)
    assert model.feature_widths_ == [4, 4000]
