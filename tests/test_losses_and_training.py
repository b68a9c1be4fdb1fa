import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ltlearn._optimizers import ForeachOptimizer
from ltlearn._training import fit_module, resolve_device
from ltlearn.exceptions import DeviceError
from ltlearn.heads import (
    L2Normalizer,
    NormalizedHead,
    Standardizer,
    make_head,
    make_normalizer,
)
from ltlearn.losses import LogitAdjustedLoss


def test_logit_adjusted_loss_matches_hand_computation():
    prior = torch.tensor([0.7, 0.2, 0.1])
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([2, 1])
    loss = LogitAdjustedLoss(prior, tau=1.0)(logits, target)
    z = logits.numpy() + np.log(prior.numpy())
    expected = np.mean(
        [
            -(z[0, 2] - np.log(np.exp(z[0]).sum())),
            -(z[1, 1] - np.log(np.exp(z[1]).sum())),
        ]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    plain = LogitAdjustedLoss(prior, tau=0.0)(logits, target)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())


def test_logit_adjusted_loss_weights_samples():
    loss = LogitAdjustedLoss(torch.tensor([0.5, 0.5]))
    logits = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    target = torch.tensor([0, 1])
    per_sample = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    weighted = loss(logits, target, torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx(
        ((per_sample * torch.tensor([1.0, 3.0])).sum() / 4).item()
    )


def test_normalizers():
    X = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(L2Normalizer(2)(X).norm(dim=1).numpy(), math.sqrt(2), rtol=1e-6)
    std = make_normalizer("standard", X)
    assert isinstance(std, Standardizer)
    np.testing.assert_allclose(std(X).numpy(), [[1.0, 1.0], [-1.0, -1.0]], atol=1e-6)
    # A constant column is left unscaled rather than divided by zero.
    const = Standardizer.from_data(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    assert torch.isfinite(const(torch.tensor([[2.0, 6.0]]))).all()


def test_linear_head_starts_at_the_given_bias():
    head = make_head("linear", 3, 2, bias_init=torch.tensor([0.5, -0.5]))
    np.testing.assert_allclose(head(torch.zeros(1, 3)).detach().numpy(), [[0.5, -0.5]])


def test_fit_module_reduces_the_loss_and_returns_a_cpu_module_in_eval_mode():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 5, generator=g)
    y = (X[:, 0] > 0).long()
    head = make_head("mlp", 5, 2, hidden_size=8, generator=g)
    history = fit_module(
        head,
        LogitAdjustedLoss(torch.tensor([0.5, 0.5])),
        X,
        y,
        max_epochs=10,
        batch_size=64,
        generator=g,
        lr=1e-2,
    )
    assert history[-1] < history[0] * 0.5
    assert not head.training
    assert next(head.parameters()).device.type == "cpu"


def test_mixup_trains_on_mixed_rows_and_softens_the_fit():
    def fit(mixup):
        g = torch.Generator().manual_seed(0)
        X = torch.randn(600, 5, generator=g)
        y = (X[:, 0] > 0).long()
        head = make_head("linear", 5, 2, generator=g)
        criterion = LogitAdjustedLoss(torch.tensor([0.5, 0.5]))
        kwargs = dict(max_epochs=30, batch_size=64, generator=g, lr=5e-2, weight_decay=0)
        fit_module(head, criterion, X, y, mixup=mixup, **kwargs)
        with torch.no_grad():
            proba = head(X).softmax(dim=1)
        return float((proba.argmax(dim=1) == y).float().mean()), float(proba.max(dim=1)[0].mean())

    # One criterion call per step: LDAM's and RIDE's losses count their calls as steps.
    calls = []

    class Counted(LogitAdjustedLoss):
        def forward(self, logits, target, sample_weight=None):
            calls.append(len(target))
            return super().forward(logits, target, sample_weight)

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(100, 5, generator=g), torch.arange(100) % 2
    head = make_head("linear", 5, 2, generator=g)
    fit_module(
        head,
        Counted(torch.tensor([0.5, 0.5])),
        X,
        y,
        max_epochs=2,
        batch_size=50,
        generator=g,
        mixup=0.4,
    )
    assert calls == [100] * 4  # 2 epochs of 2 batches, each mixed row with both targets

    plain_accuracy, plain_confidence = fit(0.0)
    mixed_accuracy, mixed_confidence = fit(1.0)
    assert plain_accuracy > 0.95 and mixed_accuracy > 0.95
    # Targets between the classes teach smaller margins: 0.90 -> 0.84 here.
    assert mixed_confidence < plain_confidence - 0.03


def test_divergence_is_reported():
    X = torch.tensor([[3e38, 0.0], [0.0, 3e38]]).repeat(5, 1)
    y = torch.tensor([0, 1] * 5)
    with pytest.raises(FloatingPointError, match="diverged"):
        fit_module(
            make_head("linear", 2, 2),
            LogitAdjustedLoss(torch.tensor([0.5, 0.5])),
            X,
            y,
            optimizer="sgd",
            max_epochs=3,
            lr=10.0,
            generator=torch.Generator().manual_seed(0),
        )


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="not supported"):
        resolve_device("meta")


@pytest.mark.parametrize("normalize", ["l2", "standard", None])
@pytest.mark.parametrize("kind", ["linear", "cosine", "mlp"])
def test_normalized_head_equals_normaliser_then_head(normalize, kind):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g) * 3 + 1
    head = make_head(kind, 6, 4, hidden_size=8, generator=g)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    module = NormalizedHead(make_normalizer(normalize, X), head)
    with torch.no_grad():
        np.testing.assert_allclose(
            module(X).numpy(), head(module.normalizer(X)).numpy(), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_foreach_optimizer_matches_torch_optim(kind):
    """Same updates as torch.optim over 200 steps, decayed and undecayed groups, varying lr."""
    torch.manual_seed(0)
    X, y = torch.randn(256, 6), torch.randint(0, 4, (256,))
    ours = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    theirs = copy.deepcopy(ours)

    # A parameter that the loss never uses gets no gradient: both leave it alone.
    ours.register_parameter("unused", torch.nn.Parameter(torch.ones(2, 2)))
    theirs.register_parameter("unused", torch.nn.Parameter(torch.ones(2, 2)))

    def groups(module):
        matrices = [p for p in module.parameters() if p.ndim == 2]
        vectors = [p for p in module.parameters() if p.ndim == 1]
        return [{"params": matrices, "weight_decay": 0.05}, {"params": vectors, "weight_decay": 0}]

    optimizer = ForeachOptimizer(kind, groups(ours))
    reference = {
        "adam": lambda g: torch.optim.Adam(g, lr=1.0),
        "adamw": lambda g: torch.optim.AdamW(g, lr=1.0),
        "sgd": lambda g: torch.optim.SGD(g, lr=1.0, momentum=0.9, nesterov=True),
    }[kind](groups(theirs))
    for step in range(200):
        lr = 0.02 * (1 + math.cos(math.pi * step / 200)) / 2 + 1e-4
        rows = torch.arange(step % 4 * 64, step % 4 * 64 + 64)
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[rows]), y[rows]).backward()
        optimizer.step(lr)
        for group in reference.param_groups:
            group["lr"] = lr
        reference.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours.unused, torch.ones(2, 2))


def test_foreach_optimizer_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ForeachOptimizer("lbfgs", [])


def test_first_fit_in_a_fresh_process_does_not_import_dynamo():
    """torch.optim imports torch._dynamo (1 to 2 s); the training loop must not need it."""
    code = (
        "import sys, numpy as np\n"
        "from ltlearn import BalancedSoftmaxClassifier\n"
        "BalancedSoftmaxClassifier(max_epochs=2, device='cpu').fit(np.eye(6), [0, 1, 2] * 2)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
