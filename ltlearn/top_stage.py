"""A trainable top stage: the backbone's last part, trained on activations cached at a cut.

On a frozen embedding a linear head trained with any logit-adjusted loss
differs from the plain one only by its bias, so experts trained with
different long-tail losses collapse to offsets. Caching the backbone's
activations one stage earlier (``extract(..., cut=...)``) and training a copy
of the stage that follows, with the classifier, gives the model (and each
expert) features of its own, as the papers' experts own their later stages
(SADE: Zhang et al., NeurIPS 2022, Sec. 4; RIDE: Wang et al., ICLR 2021).

The fit follows linear probing then fine-tuning (LP-FT; Kumar et al.,
"Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022): the estimator's head is first fitted on the
frozen top's embeddings exactly as on an embedding file, then the top and the
head are trained together for a few epochs, on horizontally flipped maps half
of the time, keeping the epoch (the linear probe included) whose balanced
accuracy on held-out training rows is highest.
"""

import copy
import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

__all__ = ["TopStage", "TopStageModule", "fit_top_stage"]

# Rows per forward pass through a top outside training: its activations take hundreds
# of KB per row.
CHUNK = 256


def _own_part(top):
    """``(shared, own)``: the top split before its last part with parameters.

    EfficientNet-Lite's top gives each expert its head convolution and batch
    norm; a sequential top its last child that has parameters.
    """
    from ltlearn.features.backbones import _EfficientNetLiteTop

    if isinstance(top, _EfficientNetLiteTop):
        return top.blocks, nn.Sequential(top.head, _GlobalPool())
    if isinstance(top, nn.Sequential):
        children = list(top)
        last = max(i for i, child in enumerate(children) if any(True for _ in child.parameters()))
        return nn.Sequential(*children[:last]), nn.Sequential(*children[last:])
    raise ValueError(
        "experts='head', train='last' and a top modulated by PRL's preference need a top "
        "whose last part can be told apart: "
        f"EfficientNet-Lite0's or an nn.Sequential; got {type(top).__name__}."
    )


class _GlobalPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.mean(dim=1)


#: Modules taken for the nonlinearity before which a modulated top is scaled and shifted.
_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
)


def _chain(module):
    """The modules that nested ``nn.Sequential`` containers run, in order."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _chain(child)]
    return [module]


class _Modulated(nn.Module):
    """A top's own part whose channels at one place are scaled and shifted by a condition.

    The place is before the first nonlinearity after the part's last module
    with parameters (EfficientNet-Lite0: the head convolution's batch norm,
    before its ReLU6), or that module's input when no nonlinearity follows
    it, so that the scales and shifts change which activations pass, not
    only the embedding's scale (FiLM; Perez et al., "FiLM: Visual Reasoning
    with a General Conditioning Layer", AAAI 2018).
    """

    def __init__(self, own, row_shape):
        super().__init__()
        chain = _chain(own)
        last = max(i for i, m in enumerate(chain) if any(True for _ in m.parameters()))
        after = [i for i in range(last + 1, len(chain)) if isinstance(chain[i], _ACTIVATIONS)]
        at = after[0] if after else last
        self.before = nn.Sequential(*chain[:at])
        self.after = nn.Sequential(*chain[at:])
        with torch.no_grad():
            h = self.before(torch.zeros(1, *row_shape))
        #: Channels the scales and shifts act on: axis 1 of maps, the last axis otherwise.
        self.channels = int(h.shape[1] if h.ndim == 4 else h.shape[-1])

    def forward(self, x, scale=None, shift=None):
        """Embeddings of ``x``: (n, d), or (m * n, d) under m conditions' (m, channels) scales."""
        h = self.before(x)
        if scale is not None:
            m = len(scale)
            shape = (m, 1, -1, 1, 1) if h.ndim == 4 else (m, *(1,) * (h.ndim - 1), -1)
            h = (h.unsqueeze(0) * (1.0 + scale.view(shape)) + shift.view(shape)).flatten(0, 1)
        return self.after(h)


class TopStageModule(nn.Module):
    """Cached activations -> shared top -> each expert's own top -> normaliser -> head.

    The pretrained layers run as they did at extraction: in eval mode
    whatever the module's mode, so their batch-norm statistics stay frozen
    and no stochastic depth is drawn; only their weights learn.

    Parameters
    ----------
    shared : torch.nn.Module
        The part of the top all experts share (the identity when each owns all).
    tops : list of torch.nn.Module
        One per expert (one for a single model), each ending in a pooled
        embedding of ``n_features``.
    normalizer, head : torch.nn.Module
        As in :class:`ltlearn.heads.NormalizedHead`; with several tops the
        head receives ``(n, n_tops, n_features)``.
    modulation : torch.nn.Module, default=None
        Maps conditions ``(m, k)`` to per-channel ``(scale, shift)`` of the one
        top (a ``_Modulated`` part): the module's first extra argument is the
        condition, or, without one, ``head.condition()`` draws it, and the
        head receives the embeddings ``(m, n, n_features)`` and the condition.
    """

    def __init__(self, shared, tops, normalizer, head, modulation=None):
        super().__init__()
        self.shared = shared
        self.tops = nn.ModuleList(tops)
        self.normalizer = normalizer
        self.head = head
        self.modulation = modulation

    def train(self, mode=True):
        super().train(mode)
        self.shared.eval()
        self.tops.eval()
        return self

    def embed(self, x, condition=None):
        """The normalised embedding(s): (n, d), (n, n_tops, d) with several tops, or
        (m, n, d) under m conditions."""
        x = self.shared(x)
        if condition is not None:
            scale, shift = self.modulation(condition)
            z = self.normalizer(self.tops[0](x, scale, shift))
            return z.view(len(condition), len(x), -1)
        if len(self.tops) == 1:
            return self.normalizer(self.tops[0](x))
        return torch.stack([self.normalizer(top(x)) for top in self.tops], dim=1)

    def forward(self, x, *args):
        if self.modulation is None:
            return self.head(self.embed(x), *args)
        condition = args[0] if args else self.head.condition()
        return self.head(self.embed(x, condition), condition)

    def parameter_groups(self, head_lr_scale):
        """Parameters with their learning-rate factor: the head's trains faster."""
        head = list(self.head.parameters())
        seen = {id(p) for p in head}
        top = [p for p in self.parameters() if id(p) not in seen]
        return [(top, 1.0), (head, head_lr_scale)]


class TopStage(BaseEstimator):
    """The backbone's top, trained with the classifier on activations cached at a cut.

    Pass it as the ``head`` of :class:`~ltlearn.BalancedSoftmaxClassifier`,
    :class:`~ltlearn.SADEClassifier`, :class:`~ltlearn.RIDEClassifier` or
    :class:`~ltlearn.PRLClassifier`, and fit on the activations of ``extract(..., cut=cut)``
    (``FeatureFile.read`` returns them as ``(n, C, H, W)``), or on a split of
    that file (``FeatureFile(path)["train"]``), streamed block by block for
    caches larger than memory. The estimator's
    own settings (``lr``, ``max_epochs``, ``normalize`` ...) fit its head on
    the frozen top's embeddings first; the settings here then fine-tune top
    and head together.

    Parameters
    ----------
    backbone : str or Backbone, default="efficientnet-lite0"
        The backbone the activations came from, by name as ``extract`` takes
        it or as an object (:mod:`ltlearn.features.backbones`); its weights
        initialise the top.
    cut : str, default="model._blocks.14"
        The submodule the activations were cut at (the file's ``cut``
        attribute). EfficientNet-Lite0's default leaves its last block and
        its head convolution to train (1.0 M parameters).
    top : torch.nn.Module, default=None
        The top itself, for a backbone ltlearn cannot split: maps a batch of
        activations to pooled embeddings. Overrides ``backbone`` and ``cut``.
    train : {"all", "last"}, default="last"
        Which part of the top learns: all of it, or only its last part with
        parameters (EfficientNet-Lite0: the head convolution and its batch
        norm, 0.4 M of the 1.0 M parameters; a sequential top: its last
        child with parameters). With ``"last"`` the frozen part runs once
        over the training maps and their mirror images before the epochs,
        which then cost a fraction as much.
    experts : {"all", "head"}, default="all"
        For multi-expert estimators: each expert owns a whole copy of the
        top (``"all"``), or the experts share it but its last part (for
        EfficientNet-Lite0, the head convolution and its batch norm;
        ``"head"``), which trains faster and holds less. With
        ``train="last"`` the frozen part is shared in any case.
    epochs : int, default=5
        Fine-tuning epochs after the linear probe; 0 keeps the probe.
    lr : float, default=2e-4
        Peak learning rate of the top (AdamW, one-cycle schedule). The head
        comes from the probe already fitted: at 1e-3 (10x for the head) the
        first epoch undid it (balanced validation accuracy 80.0 -> 66.3 % on
        CIFAR-10-LT at IR 100) and the last ones did not recover.
    head_lr_scale : float, default=1.0
        The head's learning rate as a multiple of ``lr``.
    weight_decay : float, default=0.05
        Decoupled weight decay of the fine-tuning.
    batch_size : int, default=128
    flip : bool, default=True
        Flip each training map horizontally with probability 1/2 (the
        activations of a mirrored image, approximately). Activations of
        augmented views, cut at the same module (``extract(..., cut=...,
        views=K)``) and passed to the estimator's ``fit(X, y, views=V)``,
        join the plain maps: each fine-tuning step draws one of a row's
        plain map and views, then mirrors it half of the time (with
        ``train="last"``, the plain map's mirror image is one more draw,
        computed once through the frozen part).
    mixup : float, default=0.0
        Concentration of mixup of the training maps in the fine-tuning (with
        ``train="last"``, of the frozen part's outputs); 0 for none.
    validation_fraction : float, default=0.1
        Share of each class's training rows held out to choose the epoch
        (the linear probe counts as epoch 0) by balanced accuracy, and to
        fit the calibration temperature; 0 trains on every row and keeps the
        last epoch.
    recalibrate : bool, default=True
        Correct the kept model's logits by the temperature and class offsets
        that calibrate them on the held-out rows (those of
        ``calibration_cv``'s calibration, fitted on these rows instead of
        cross-fitted copies), for estimators with one top
        (:class:`~ltlearn.BalancedSoftmaxClassifier`, and
        :class:`~ltlearn.PRLClassifier`, whose every preference gets the
        correction of its balanced logits, the class offsets it stands for
        left as they are). Fine-tuning nearly
        memorises the training rows, so the logit adjustment stops acting
        and the model leans toward the head classes: on CIFAR-10-LT at IR
        100 (validation pool, two seeds) the correction raised balanced
        accuracy from 80.56 to 81.24 and from 78.78 to 79.68 % with
        ``train="all"`` and views, and by 0.00 and 0.34 point with the
        defaults. The fitted model then predicts the
        corrected logits, and its ``calibration_temperature_`` and
        ``calibration_bias_`` are 1 and 0. Multi-expert estimators keep
        their experts' logits, which their aggregation or router weighs.
        Needs held-out rows (``validation_fraction > 0``).

    Examples
    --------
    >>> import torch
    >>> from ltlearn import BalancedSoftmaxClassifier
    >>> top = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten())
    >>> X = torch.randn(60, 4, 3, 3).numpy()
    >>> y = (X[:, 0].mean(axis=(1, 2)) > 0).astype(int)
    >>> clf = BalancedSoftmaxClassifier(head=TopStage(top=top, epochs=1), random_state=0)
    >>> clf.fit(X, y).predict(X[:3]).shape
    (3,)
    """

    _parameter_constraints: dict = {
        "backbone": [str, object],
        "cut": [str],
        "top": [nn.Module, None],
        "train": [StrOptions({"all", "last"})],
        "experts": [StrOptions({"all", "head"})],
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "head_lr_scale": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "flip": ["boolean"],
        "mixup": [Interval(Real, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "recalibrate": ["boolean"],
    }

    def __init__(
        self,
        backbone="efficientnet-lite0",
        cut="model._blocks.14",
        *,
        top=None,
        train="last",
        experts="all",
        epochs=5,
        lr=2e-4,
        head_lr_scale=1.0,
        weight_decay=0.05,
        batch_size=128,
        flip=True,
        mixup=0.0,
        validation_fraction=0.1,
        recalibrate=True,
    ):
        self.backbone = backbone
        self.cut = cut
        self.top = top
        self.train = train
        self.experts = experts
        self.epochs = epochs
        self.lr = lr
        self.head_lr_scale = head_lr_scale
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.flip = flip
        self.mixup = mixup
        self.validation_fraction = validation_fraction
        self.recalibrate = recalibrate

    def _pretrained_top(self):
        if self.top is not None:
            return copy.deepcopy(self.top).eval()
        from ltlearn.features.backbones import Backbone, load_backbone

        backbone = self.backbone
        if isinstance(backbone, str):
            backbone = load_backbone(backbone)
        if not isinstance(backbone, Backbone):
            raise TypeError(
                "TopStage's backbone must be a backbone name such as 'efficientnet-lite0' or a "
                f"Backbone; got {type(backbone).__name__}."
            )
        return backbone.split(self.cut)[1]

    def build(self, row_shape, n_tops=1, modulated=False):
        """The shared part and ``n_tops`` own parts of the top, and the embedding width.

        A forward pass of one zero row checks that rows of ``row_shape`` fit
        the top. ``modulated`` splits the top in any case and makes its own
        part one that conditions can scale and shift (``_Modulated``, whose
        ``channels`` says how many they act on).

        Returns
        -------
        shared : torch.nn.Module
        tops : list of torch.nn.Module
        n_features : int
        """
        self._validate_params()
        top = self._pretrained_top()
        where = (
            "the top given as top="
            if self.top is not None
            else f"the top of {getattr(self.backbone, 'name', self.backbone)} after {self.cut!r}"
        )
        try:
            with torch.no_grad():
                out = top(torch.zeros(1, *row_shape))
        except RuntimeError as exc:
            raise ValueError(
                f"Rows of shape {tuple(row_shape)} do not fit {where} ({exc}). Fit on the "
                "activations that extract(..., cut=...) stored for this backbone and cut "
                "(FeatureFile.read returns them in their shape)."
            ) from exc
        if out.ndim != 2:
            raise ValueError(
                f"{where} returns shape {tuple(out.shape)} for one row; it must return pooled "
                "embeddings of shape (n, d)."
            )
        if modulated or self.train == "last" or (n_tops > 1 and self.experts == "head"):
            shared, own = _own_part(top)
            if modulated:
                with torch.no_grad():
                    own = _Modulated(own, shared(torch.zeros(1, *row_shape)).shape[1:])
            tops = [copy.deepcopy(own) for _ in range(n_tops)]
            if self.train == "last":
                shared.requires_grad_(False)
        else:
            shared, tops = nn.Identity(), [copy.deepcopy(top) for _ in range(n_tops)]
        return shared, tops, int(out.shape[1])

    def augment(self, x, generator):
        """Training maps, each flipped along its width with probability 1/2."""
        if not self.flip or x.ndim != 4:
            return x
        flip = torch.rand(len(x), generator=generator) < 0.5
        flip = flip.to(x.device).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(-1), x)

    def n_steps(self, n_rows):
        return self.epochs * math.ceil(n_rows / min(self.batch_size, n_rows))


class _Recalibrated(nn.Module):
    """A head whose logits are scaled by ``scale`` then shifted by ``shift`` (per class).

    Holds the correction :class:`TopStage` fits on held-out rows
    (``recalibrate=True``) inside the module, so that every prediction
    method, pickles and adaptation read the corrected logits.
    """

    def __init__(self, head, scale, shift):
        super().__init__()
        self.head = head
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))

    def forward(self, *args):
        return self.head(*args) * self.scale + self.shift


class _PickOne:
    """Picks, for each training row, one of its stacked inputs at random, then ``augment``s it.

    The inputs of a row are its mirror image's and its own frozen features, or
    its own maps and those of its augmented views.
    """

    def __init__(self, augment=None):
        self.augment = augment

    def __call__(self, stacked, generator):
        n, k = stacked.shape[:2]
        pick = (torch.rand(n, generator=generator) * k).long().clamp_max(k - 1)
        picked = stacked[torch.arange(n, device=stacked.device), pick.to(stacked.device)]
        return picked if self.augment is None else self.augment(picked, generator)


def _in_chunks(module, X, device=None, dim=0):
    """``module`` over the rows of ``X`` a chunk at a time; outputs joined along ``dim``."""
    with torch.no_grad():
        parts = [module(X[i : i + CHUNK].to(device)).cpu() for i in range(0, len(X), CHUNK)]
    return torch.cat(parts, dim=dim)


def _through(module, X, rows=None, device=None):
    """``module`` over the rows of ``X`` (or those at the sorted indices ``rows``), in order.

    ``X`` is a float tensor, or a :class:`~ltlearn.features.FeatureSplit` read
    block by block.
    """
    if isinstance(X, torch.Tensor):
        return _in_chunks(module, X if rows is None else X[rows], device)
    keep = None
    if rows is not None:
        keep = np.zeros(len(X), dtype=bool)
        keep[np.asarray(rows)] = True
    parts = []
    for ids, block in X.blocks():
        block = block if keep is None else block[keep[ids]]
        if len(block):
            parts.append(_in_chunks(module, torch.from_numpy(block), device))
    return torch.cat(parts)


def fit_top_stage(estimator, X, y_t, w_t, prior, generator, device, views=None):
    """Fit ``estimator``'s :class:`TopStage` head: the linear probe, then fine-tuning.

    The estimator supplies its loss (``_make_criterion``), its head on
    embeddings (``_make_module``), its normaliser and its settings for the
    probe; ``estimator.head`` (the TopStage) those of the fine-tuning.
    ``X`` is an array of activations, or a :class:`~ltlearn.features.FeatureSplit`
    of them, streamed: the probe's embeddings and the held-out rows are read
    in one pass each, and every fine-tuning epoch reads the training rows
    block by block (a frozen part then runs at every step).

    Returns
    -------
    module : TopStageModule
    criterion : torch.nn.Module
    held : ndarray of int
        The held-out rows (empty with ``validation_fraction=0``).
    record : dict
        ``validation_scores`` (balanced accuracy on the held-out rows, before
        fine-tuning then after each epoch; None without held-out rows),
        ``best_epoch`` and ``history``, the probe's then the fine-tuning's
        epoch losses.
    """
    from ltlearn._base import _float_tensor, _resolve_schedule
    from ltlearn._training import StreamedInputs, fit_module, seed_from
    from ltlearn.datasets import train_val_split

    stage = estimator.head
    modulated = estimator._modulates_top()
    shared, tops, n_features = stage.build(X.shape[1:], estimator._n_tops, modulated)
    n_classes = len(estimator.classes_)
    # A FeatureSplit streams: read block by block, never whole.
    streamed = not isinstance(X, np.ndarray)
    X_t = X if streamed else _float_tensor(X)
    train, held = np.arange(len(X)), np.empty(0, dtype=np.intp)
    if stage.validation_fraction > 0:
        seed = seed_from(generator)
        with warnings.catch_warnings():
            # A class of one row stays in training; its validation loss is not needed.
            warnings.filterwarnings("ignore", message=".*single sample")
            train, held = train_val_split(
                y_t.numpy(), val_size=stage.validation_fraction, random_state=seed
            )
    rows = torch.as_tensor(train)
    # With a frozen part, the epochs train what follows it on its outputs, computed once
    # (in memory; a streamed fit runs it at every step).
    frozen = stage.train == "last" and not streamed
    inputs = _in_chunks(shared, X_t) if frozen else X_t
    if frozen:
        E = _in_chunks(tops[0], inputs)
    else:
        E = _through(lambda x: tops[0](shared(x)), X_t)
    with torch.no_grad():
        normalizer = estimator._make_normalizer(E[rows])
        Z = normalizer(E)
    lr, batch_size, max_epochs = _resolve_schedule(
        estimator.lr, estimator.batch_size, estimator.max_epochs, len(train), n_features
    )
    n_steps = max_epochs * math.ceil(len(train) / min(batch_size, len(train)))
    total_steps = n_steps + stage.n_steps(len(train))
    criterion = estimator._make_criterion(prior, total_steps)
    head = estimator._make_module(n_features, n_classes, prior, generator, total_steps)
    common = dict(
        balanced_sampling=getattr(estimator, "balanced_sampling", False),
        device=device,
        generator=generator,
        verbose=estimator.verbose,
        desc=type(estimator).__name__,
    )
    # Linear probe: the head on the frozen top's embeddings, as on an embedding file.
    history = fit_module(
        head,
        criterion,
        Z[rows],
        y_t[rows],
        sample_weight=w_t[rows],
        optimizer=estimator.optimizer,
        lr=lr,
        weight_decay=estimator.weight_decay,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr_schedule=estimator.lr_schedule,
        **common,
    )
    # Drawn after the head so that unmodulated fits draw as before; it starts as the identity.
    modulation = estimator._make_modulation(tops[0].channels, generator) if modulated else None
    module = TopStageModule(shared, tops, normalizer, head, modulation)
    trained = (
        TopStageModule(nn.Identity(), tops, normalizer, head, modulation) if frozen else module
    )
    validation = None
    if len(held):
        held_t = torch.as_tensor(held)
        X_held = torch.from_numpy(X.take(held)) if streamed else inputs[held_t]
        y_held = y_t[held_t]
        y_held_device = y_held.to(device)
        present = torch.bincount(y_held, minlength=n_classes) > 0

        def validation(trained):
            # Balanced error: the fine-tuned top grows over-confident long before it stops
            # gaining accuracy (held-out loss up, accuracy up), and the temperature fitted
            # on these rows afterwards undoes the over-confidence.
            trained.eval()
            with torch.no_grad():
                # Logits have their rows on axis -2 (experts first).
                out = _in_chunks(trained, X_held, device, dim=-2).to(device)
            scores = out if out.ndim == 2 else out.mean(dim=0)  # experts: their mean logits
            correct = (scores.argmax(dim=1) == y_held_device).float()
            hits = torch.zeros(n_classes, device=device).index_add_(0, y_held_device, correct)
            totals = torch.bincount(y_held_device, minlength=n_classes).clamp_min(1)
            return 1.0 - float((hits / totals)[present.to(device)].mean())

    record = {}
    if stage.epochs and streamed:
        # Row indices into the whole split; the held-out rows are left out as read.
        train_inputs, y_fit, w_fit = StreamedInputs(X, None, rows=train), y_t, w_t
        augment = stage.augment
    elif stage.epochs:
        y_fit, w_fit = y_t[rows], w_t[rows]
        candidates, augment = [inputs[rows]], stage.augment
        if frozen and stage.flip and X.ndim == 4:
            # The frozen part's output of a mirrored map is not its output mirrored: both
            # are computed once. The mirror comes first, which draws the pick of each row
            # as releases without views did, so their fits reproduce.
            candidates.insert(0, _in_chunks(shared, X_t[rows].flip(-1)))
            augment = None
        if views is not None:
            V = _float_tensor(views)[rows]
            candidates += [
                _in_chunks(shared, V[:, j]) if frozen else V[:, j] for j in range(V.shape[1])
            ]
            del V
        train_inputs = candidates[0]
        if len(candidates) > 1:
            train_inputs, augment = torch.stack(candidates, 1), _PickOne(augment)
        del candidates  # the stack is a copy, gigabytes on CIFAR-10-LT with views
    if stage.epochs:
        history += fit_module(
            trained,
            criterion,
            train_inputs,
            y_fit,
            sample_weight=w_fit,
            optimizer="adamw",
            lr=stage.lr,
            weight_decay=stage.weight_decay,
            max_epochs=stage.epochs,
            batch_size=stage.batch_size,
            lr_schedule="onecycle",
            augment=augment,
            mixup=stage.mixup,
            validation=validation,
            parameter_groups=trained.parameter_groups(stage.head_lr_scale),
            record=record,
            **common,
        )
    record.setdefault("best_epoch", stage.epochs)
    record["validation_scores"] = [1.0 - e for e in record.get("validation_scores", [])] or None
    record["history"] = history
    return module.eval(), criterion, held, record
