"""The one training loop behind every torch-backed estimator of ltlearn."""

import copy
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ltlearn._optimizers import ForeachOptimizer
from ltlearn.exceptions import DeviceError, TrainingDivergedError

LR_SCHEDULES = ("onecycle", "cosine", "constant")


def resolve_device(device):
    """Turn a ``device`` parameter into a :class:`torch.device` this machine has.

    ``"auto"`` picks the first CUDA GPU when there is one and the CPU otherwise.
    A CUDA device that is absent raises :class:`~ltlearn.exceptions.DeviceError`.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={device!r} was requested but torch finds no CUDA GPU on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                "use device='cpu' or device='auto'."
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(
                f"device={device!r} was requested but this machine has {count} CUDA GPU(s) "
                f"(cuda:0 .. cuda:{count - 1})."
            )
    elif resolved.type != "cpu":
        raise DeviceError(f"device={device!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'.")
    return resolved


def torch_generator(random_state):
    """A CPU :class:`torch.Generator` seeded from a numpy RandomState."""
    return torch.Generator().manual_seed(int(random_state.randint(np.iinfo(np.int32).max)))


def seed_from(generator):
    """A seed drawn from a torch generator, for the numpy and scikit-learn draws of a fit.

    Every random choice of a fit then follows from ``random_state`` through one stream.
    """
    return int(torch.randint(np.iinfo(np.int32).max, (1,), generator=generator))


def _make_optimizer(name, module, weight_decay, parameter_groups=None):
    # Weight decay on matrices only: decaying biases or a cosine scale only hurts.
    groups = []
    for params, lr_scale in parameter_groups or [(list(module.parameters()), 1.0)]:
        decay = [p for p in params if p.requires_grad and p.ndim >= 2]
        rest = [p for p in params if p.requires_grad and p.ndim < 2]
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
            {"params": rest, "weight_decay": 0, "lr_scale": lr_scale},
        ]
    return ForeachOptimizer(name, [g for g in groups if g["params"]])


def _make_schedule(name, total_steps):
    """The learning-rate factor of each step, as a function of the step number."""
    if name == "constant":
        return lambda step: 1.0
    # "onecycle": the first 10 % of steps ramp up from lr / 25, as torch's
    # OneCycleLR does; both schedules then follow a cosine down to zero.
    warmup = int(0.1 * total_steps) if name == "onecycle" else 0

    def factor(step):
        if step < warmup:
            return 0.04 + 0.96 * step / warmup
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class StreamedInputs:
    """Training rows read block by block from a :class:`~ltlearn.features.FeatureSplit`.

    Each epoch visits the split's HDF5 chunks in an order drawn from the
    fit's generator (file order when all fit in one block, which then
    trains exactly as the same rows in memory would), normalises each block
    with ``transform`` (None: as read) and hands it to the loop with its row
    indices, keeping only the rows in ``rows`` when given (those not held
    out).
    """

    def __init__(self, split, transform, rows=None):
        self.split, self.transform = split, transform
        self.keep = None
        if rows is not None:
            self.keep = np.zeros(split.shape[0], dtype=bool)
            self.keep[rows] = True
        self.n_samples = split.shape[0] if rows is None else int(self.keep.sum())

    def epoch(self, generator):
        n_chunks = len(self.split.chunk_slices())
        order = None
        if n_chunks > self.split.block_chunks:
            order = torch.randperm(n_chunks, generator=generator).tolist()
        for rows, X in self.split.blocks(order):
            finite = np.isfinite(X).reshape(len(X), -1).all(axis=1)
            if not finite.all():
                bad = rows[~finite]
                raise ValueError(
                    f"{self.split.name} holds NaN or infinite features in rows "
                    f"{bad[:5].tolist()}{' ...' if len(bad) > 5 else ''}."
                )
            if self.keep is not None:
                rows, X = rows[self.keep[rows]], X[self.keep[rows]]
            Z = torch.from_numpy(X)
            if self.transform is not None:
                with torch.no_grad():
                    Z = self.transform(Z)
            yield torch.from_numpy(rows), Z


def _epoch_batches(X, y, sample_weight, batch_size, draw_weights, generator, device, views):
    """Mini-batches ``(X, y, w)`` of one epoch: shuffled, or class-balanced when drawn."""
    if isinstance(X, torch.Tensor):
        n_samples = X.shape[0]
        if draw_weights is not None:
            order = torch.multinomial(
                draw_weights, n_samples, replacement=True, generator=generator
            )
        else:
            order = torch.randperm(n_samples, generator=generator)
        order = order.to(device)
        for start in range(0, n_samples, batch_size):
            idx = order[start : start + batch_size]
            # index_select: several times faster than X[idx] for row gathers on CPU.
            w = None if sample_weight is None else sample_weight.index_select(0, idx)
            if views:
                # (rows, views, features): one view of each row, drawn anew at each step.
                view = torch.randint(X.shape[1], (len(idx),), generator=generator).to(device)
                picked = X.reshape(-1, X.shape[-1]).index_select(0, idx * X.shape[1] + view)
            else:
                picked = X.index_select(0, idx)
            yield picked, y.index_select(0, idx), w
        return
    # Streamed: shuffled (or drawn) within each block, and rows left over at the end
    # of a block go into the next batch, so that every batch but the last is full.
    rows_left, Z_left = None, None
    for rows, Z in X.epoch(generator):
        if draw_weights is not None:
            pick = torch.multinomial(
                draw_weights[rows], len(rows), replacement=True, generator=generator
            )
        else:
            pick = torch.randperm(len(rows), generator=generator)
        rows, Z = rows[pick], Z[pick]
        if rows_left is not None:
            rows, Z = torch.cat([rows_left, rows]), torch.cat([Z_left, Z])
        full = len(rows) - len(rows) % batch_size
        for start in range(0, full, batch_size):
            idx = rows[start : start + batch_size].to(device)
            w = None if sample_weight is None else sample_weight.index_select(0, idx)
            yield Z[start : start + batch_size].to(device), y.index_select(0, idx), w
        rows_left, Z_left = rows[full:], Z[full:]
    if rows_left is not None and len(rows_left):
        idx = rows_left.to(device)
        w = None if sample_weight is None else sample_weight.index_select(0, idx)
        yield Z_left.to(device), y.index_select(0, idx), w


def fit_module(
    module,
    criterion,
    X,
    y,
    *,
    sample_weight=None,
    optimizer="adam",
    lr=3e-3,
    weight_decay=1e-2,
    max_epochs=15,
    batch_size=1024,
    lr_schedule="onecycle",
    balanced_sampling=False,
    device=None,
    generator=None,
    verbose=False,
    desc="fit",
    stop_when=None,
    views=False,
    augment=None,
    validation=None,
    n_iter_no_change=None,
    parameter_groups=None,
    record=None,
    mixup=0.0,
):
    """Train ``module`` to minimise ``criterion(module(X_batch), y_batch, w_batch)``.

    An in-memory training set is moved to ``device`` once and mini-batches are
    gathered there, so a step costs a few kernel launches and no host transfer;
    a streamed one sends each batch.
    The module comes back on the CPU in eval mode, ready to pickle anywhere.

    Parameters
    ----------
    module : torch.nn.Module
        Trained in place.
    criterion : torch.nn.Module
        Called as ``criterion(output, target, sample_weight)``, returns a scalar.
    X : torch.Tensor of shape (n_samples, ...) or StreamedInputs
        Training inputs (already normalised), or rows streamed from a feature
        file (normalised block by block).
    y : torch.Tensor of shape (n_samples,)
        Integer class indices.
    sample_weight : torch.Tensor of shape (n_samples,), optional
    optimizer : {"adam", "adamw", "sgd"}
        ``"adam"`` and ``"sgd"`` (Nesterov momentum 0.9) add ``weight_decay`` as
        an L2 penalty to the gradient; ``"adamw"`` decays weights decoupled.
    lr : float
        Peak learning rate.
    weight_decay : float
        Applied to weight matrices, not to biases.
    max_epochs, batch_size : int
    lr_schedule : {"onecycle", "cosine", "constant"}
        ``"onecycle"``: 10 % warm-up then cosine decay; ``"cosine"``: cosine decay.
    balanced_sampling : bool
        Draw each epoch's samples with replacement, with probability inversely
        proportional to their class size, so that batches are class-balanced.
    device : torch.device, default=None
        None trains on the CPU.
    generator : torch.Generator
        Decides the shuffling and sampling order.
    verbose : bool
        Show a progress bar over epochs with the running loss.
    desc : str
        Label of the progress bar.
    stop_when : callable, optional
        Called with the module after each epoch; training ends early when it
        returns True (e.g. SADE's test-time aggregation, which stops once an
        expert's weight falls below a threshold).
    views : bool
        ``X`` has shape (n_samples, n_views, n_features), augmented views of
        each row: each step sees one view of each sampled row, drawn
        uniformly.
    augment : callable, optional
        ``augment(X_batch, generator)``: a random transformation of each
        training batch (e.g. flips of cached activation maps).
    validation : callable, optional
        ``validation(module) -> float``, a loss on held-out rows (lower is
        better), called before the first epoch and after each one: the
        module ends with the parameters of its best call (early stopping
        with the best epoch restored; epoch 0 is the module as it came).
    n_iter_no_change : int, optional
        With ``validation``: stop once this many epochs in a row brought no
        validation loss below the best so far. None runs ``max_epochs``.
    parameter_groups : list of (list of parameters, float), optional
        The trainable parameters in groups, each with its learning-rate
        factor; None trains all of ``module``'s at ``lr``.
    record : dict, optional
        Receives ``validation_scores`` (one per call of ``validation``) and
        ``best_epoch``.
    mixup : float, default=0.0
        Concentration ``alpha`` of mixup (Zhang et al., ICLR 2018): each batch
        is replaced by its convex combination with a shuffled copy of itself,
        with a weight drawn from Beta(alpha, alpha), and the loss is the same
        combination of the two rows' losses. 0 trains on the rows as they are.

    Returns
    -------
    history : list of float
        Mean training loss of each epoch.
    """
    device = torch.device("cpu") if device is None else device
    module.to(device).train()
    criterion.to(device)
    streamed = isinstance(X, StreamedInputs)
    n_samples = X.n_samples if streamed else X.shape[0]
    if not streamed:
        X = X.to(device)
    y = y.to(device)
    if sample_weight is not None:
        sample_weight = sample_weight.to(device)
    batch_size = min(batch_size, n_samples)
    steps_per_epoch = math.ceil(n_samples / batch_size)
    opt = _make_optimizer(optimizer, module, weight_decay, parameter_groups)
    schedule = _make_schedule(lr_schedule, steps_per_epoch * max_epochs)
    draw_weights = None
    if balanced_sampling:
        class_sizes = torch.bincount(y).to(torch.float32)
        draw_weights = (1.0 / class_sizes[y]).cpu()

    if mixup:
        mix_rng = np.random.default_rng(seed_from(generator))
    history = []
    scores, best_epoch, best_state = [], 0, None
    if validation is not None:
        scores.append(validation(module))
        module.train()
        best_state = copy.deepcopy(module.state_dict())
    epochs = tqdm(range(max_epochs), desc=desc, disable=not verbose, leave=False, unit="epoch")
    for _ in epochs:
        # Summed on the device: one host sync per epoch, not one per step.
        total = torch.zeros((), device=device)
        batches = _epoch_batches(
            X, y, sample_weight, batch_size, draw_weights, generator, device, views
        )
        for X_batch, y_batch, w in batches:
            if augment is not None:
                # Here, not where batches are drawn: the generator's draws keep their order.
                X_batch = augment(X_batch, generator)
            if mixup:
                share = float(mix_rng.beta(mixup, mixup))
                other = torch.randperm(len(y_batch), generator=generator).to(device)
                out = module(share * X_batch + (1 - share) * X_batch.index_select(0, other))
                # One call of the criterion (some count their calls as steps): each mixed
                # row twice, with either target, weighted by its share; rows on axis -2.
                w = torch.ones(len(y_batch), device=device) if w is None else w
                loss = criterion(
                    torch.cat([out, out], dim=-2),
                    torch.cat([y_batch, y_batch.index_select(0, other)]),
                    torch.cat([share * w, (1 - share) * w.index_select(0, other)]),
                )
            else:
                loss = criterion(module(X_batch), y_batch, w)
            opt.zero_grad()
            loss.backward()
            opt.step(lr * schedule(opt.steps))
            total += loss.detach()
        epoch_loss = total.item() / steps_per_epoch
        if not math.isfinite(epoch_loss):
            raise TrainingDivergedError(
                f"Training diverged: the loss became {epoch_loss} in epoch {len(history) + 1}. "
                "Lower lr, or normalise the features (normalize='l2' or 'standard')."
            )
        history.append(epoch_loss)
        epochs.set_postfix(loss=f"{epoch_loss:.4f}")
        if validation is not None:
            scores.append(validation(module))
            module.train()
            if scores[-1] < scores[best_epoch]:
                best_epoch, best_state = len(history), copy.deepcopy(module.state_dict())
            elif n_iter_no_change is not None and len(history) - best_epoch >= n_iter_no_change:
                break
        if stop_when is not None and stop_when(module):
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    if record is not None:
        # Without validation the module keeps its last epoch.
        record.update(
            validation_scores=scores,
            best_epoch=best_epoch if validation is not None else len(history),
        )
    module.cpu().eval()
    criterion.cpu()
    return history
