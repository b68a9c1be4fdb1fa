"""Run a frozen backbone over an image set and stream its embeddings to a feature file.

Resumable: rows are appended block by block through
:class:`~ltlearn.features.FeatureWriter`, and the split records how many
source items are done (``items_done``), so a run that was killed or
interrupted continues where it stopped, with no missing or duplicated rows.
Shardable: ``shard=(i, n)`` processes the i-th of n contiguous slices of the
source into its own file, and :func:`merge` joins shard files into one file
of HDF5 virtual data sets, without copying the features.
"""

import contextlib
import copy
import functools
import importlib.util
import json
import os
import random
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ltlearn._optional import import_optional
from ltlearn._training import resolve_device
from ltlearn.exceptions import FeatureFileError, LtlearnError
from ltlearn.features.backbones import Backbone
from ltlearn.features.io import FeatureWriter
from ltlearn.features.resize import ResizeNormalize, resize_uint8

__all__ = ["CorruptImageWarning", "extract"]

ENGINES = ("auto", "torch", "onnxruntime")


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was skipped (``on_error="skip"``)."""


def _uint8_chw(image):
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


class _Preprocessed(Dataset):
    """Items ``start .. stop`` of a source, preprocessed; failures become error records.

    With ``size`` (the model's input height and width), an item is the decoded
    uint8 image (and its views, at ``size`` when they differ from it in
    size), for a resize in the model's graph.
    """

    def __init__(
        self, source, preprocess, start, stop, views=0, view_transform=None, size=None, seed=0
    ):
        self.source = source
        self.start, self.stop = start, stop
        self.views, self.view_transform = views, view_transform
        self.size = size
        self.seed = seed
        self.prepare = preprocess if size is None else _uint8_chw

    def _views(self, image, index):
        """The image's views, drawn from generators seeded by ``(seed, index)`` alone.

        So an image's views do not depend on which worker, batch, shard or
        resumed run draws them. Augmentations draw from torch's, Python's or
        NumPy's global generator: all three are seeded, and restored after,
        so that a loader without workers leaves the caller's state alone.
        """
        if not self.views:
            return []
        seeds = np.random.SeedSequence([self.seed, index]).generate_state(3)
        # Saved and restored by hand: torch.random.fork_rng formats a stack trace per call.
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        numpy_state = np.random.get_state()  # noqa: NPY002
        try:
            torch.manual_seed(int(seeds[0]))
            random.seed(int(seeds[1]))
            np.random.seed(int(seeds[2]))  # noqa: NPY002 (the global one augmentations read)
            return [self.view_transform(image) for _ in range(self.views)]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)  # noqa: NPY002

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        index = self.start + i
        try:
            image, label = self.source[index]
            tensors = [self.prepare(image)]
            tensors += [self.prepare(view) for view in self._views(image, index)]
            if self.size is not None and len({t.shape for t in tensors}) > 1:
                tensors = [resize_uint8(t, self.size) for t in tensors]
            tensor = torch.stack(tensors) if self.views else tensors[0]  # (1 + views, 3, H, W)
            return index, tensor, int(label), None
        except Exception as exc:  # any decoding problem of any image library
            return index, None, -1, f"{type(exc).__name__}: {exc}"


# Rows reach the file in blocks of this many, or of what one second produced if
# that is fewer: each write flushes the file twice (about 10 ms each here), too
# much for every batch of 64 small images, while a killed run loses at most a
# second of work.
_WRITE_ROWS = 1024
_WRITE_SECONDS = 1.0


class _PendingRows:
    """Embedded rows waiting to be written, and the source items they account for."""

    def __init__(self):
        self.parts, self.rows, self.items_done = [], 0, 0
        self.since = time.monotonic()

    def add(self, features, labels, ids, views):
        self.parts.append((features, labels, ids, views))
        self.rows += len(labels)

    def due(self):
        return self.rows >= _WRITE_ROWS or (
            self.rows and time.monotonic() - self.since >= _WRITE_SECONDS
        )

    def write(self, writer, split, items_done, skipped):
        features, labels, ids, views = zip(*self.parts, strict=True)
        # items_done moves with n_rows: both are flushed by the same append.
        writer.append(
            split,
            np.concatenate(features),
            np.concatenate(labels),
            ids=[i for block in ids for i in block],
            views=None if views[0] is None else np.concatenate(views),
            progress={"items_done": items_done, "skipped": skipped},
        )
        self.parts, self.rows, self.since = [], 0, time.monotonic()


class _Collate:
    """Stacks good items into a batch; uint8 images of mixed sizes are resized to ``size`` first.

    :func:`~ltlearn.features.resize.resize_uint8` gives the pixels that the
    resize in the model's graph gives: an image's row is the same whatever
    the sizes of the other images in its batch.
    """

    def __init__(self, size=None):
        self.size = size

    def __call__(self, items):
        good = [item for item in items if item[3] is None]
        bad = [(item[0], item[3]) for item in items if item[3] is not None]
        indices = [item[0] for item in items]
        if good:
            tensors = [item[1] for item in good]
            if self.size is not None and len({t.shape for t in tensors}) > 1:
                tensors = [resize_uint8(t, self.size) for t in tensors]
            batch = torch.stack(tensors)
            labels = np.array([item[2] for item in good], dtype=np.int64)
            rows = np.array([item[0] for item in good])
        else:
            batch, labels, rows = None, np.zeros(0, np.int64), np.zeros(0, np.int64)
        return max(indices) + 1, batch, labels, rows, bad


class _OnnxRuntime:
    """The backbone exported to ONNX once (cached at ``onnx_path``) and run by onnxruntime.

    Checked against torch on the first batch of every run: a stale, wrong or
    unreadable (truncated, empty) cached export is re-exported, with a warning
    when it cannot be run, and one that still disagrees is an error.
    A model that cannot be exported is an error when onnxruntime was asked
    for (``strict``), and runs in torch with a warning when it was only the
    automatic choice.
    """

    def __init__(self, module, onnx_path, strict, name):
        self.ort = import_optional("onnxruntime", "onnx")
        self.module, self.path, self.strict, self.name = module, Path(onnx_path), strict, name
        self.session = None
        self.fallback = False

    def _export(self, batch):
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
            # The exporter puts the module back in the training mode it found it
            # in, recursively: a wrapper left in training mode turned the backbone's
            # batch norms to training mode, which the next forward pass corrupted.
            # An eval-mode copy leaves the caller's module alone.
            torch.onnx.export(
                copy.deepcopy(self.module).eval(),
                (batch[:1],),
                str(tmp),
                dynamo=False,
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                opset_version=17,
            )
        tmp.replace(self.path)

    def _open(self):
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Spinning threads would starve the DataLoader workers that share the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = self.ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )

    def _run(self, batch):
        return torch.from_numpy(self.session.run(None, {"images": batch.numpy()})[0])

    def __call__(self, batch):
        if self.fallback:
            return self.module(batch)
        if self.session is None:
            # A few rows suffice to check the export; a whole eager batch costs seconds on a CPU.
            probe = batch[:4]
            reference = self.module(probe).float()
            for attempt in ("cached", "fresh"):
                if attempt == "cached" and self.path.exists():
                    try:
                        self._open()
                        out = self._run(probe)
                    except Exception as exc:  # onnxruntime has its own types for a bad model
                        warnings.warn(
                            f"The cached ONNX export {self.path} cannot be run ({exc}); "
                            "exporting it again.",
                            stacklevel=3,
                        )
                        continue
                else:
                    try:
                        self._export(batch)
                    except Exception as exc:  # exporters fail in many ways on unusual ops
                        message = f"{self.name} cannot be exported to ONNX ({exc})"
                        if self.strict:
                            raise LtlearnError(f"{message}; use engine='torch'.") from exc
                        warnings.warn(f"{message}; running it in torch.", stacklevel=3)
                        self.fallback = True
                        return self.module(batch)
                    self._open()
                    out = self._run(probe)
                scale = reference.abs().max().clamp_min(1e-12)
                if out.shape == reference.shape and (out - reference).abs().max() <= 1e-3 * scale:
                    return self._run(batch)
            raise LtlearnError(
                f"The ONNX export of {self.name} ({self.path}) disagrees with torch "
                "on the first batch; use engine='torch'."
            )
        return self._run(batch)


class _Embedding(torch.nn.Module):
    """A backbone as a module that returns the embedding only (for export).

    With ``resize``, its input is a uint8 batch that the module resizes and
    normalises first (:class:`~ltlearn.features.resize.ResizeNormalize`).
    With ``layers``, the pooled outputs of those submodules come first, side
    by side, then the embedding; ``widths`` holds each part's width after a
    forward pass. With ``trunk`` (the backbone split at a cut), the output
    is the trunk's activations, flattened; ``row_shape`` holds their shape.
    A layer that runs more than once per forward pass (a shared
    activation module) is an error.
    """

    def __init__(self, backbone, resize=None, layers=(), trunk=None):
        super().__init__()
        self.module = backbone.module
        self.backbone = backbone
        self.resize = resize
        self.layers = list(layers)
        self.trunk = trunk
        self.widths = None
        self.row_shape = None

    def forward(self, x):
        if self.resize is not None:
            if x.is_cuda:
                # float16 autocast would round the pixel sums: the resize stays in float32.
                with torch.autocast("cuda", enabled=False):
                    x = self.resize(x)
            else:
                x = self.resize(x)
        if self.trunk is not None:
            activations = self.trunk(x)
            self.row_shape = tuple(int(d) for d in activations.shape[1:])
            return activations.flatten(1)
        if not self.layers:
            return self.backbone.embed(x)
        taken = {name: [] for name in self.layers}

        def keep(module, args, output, *, name):
            # Pooled at once: a later in-place op (ReLU(inplace=True)) would change the output.
            # Returns None: a forward hook's return value would replace the module's output.
            taken[name].append(_pooled(output, name))

        # Hooks live for one pass only: the caller's module is left as it was.
        modules = [self.module.get_submodule(name) for name in self.layers]
        handles = [
            module.register_forward_hook(functools.partial(keep, name=name))
            for module, name in zip(modules, self.layers, strict=True)
        ]
        try:
            embedding = self.backbone.embed(x)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.layers if not taken[name]]
        if missing:
            raise LtlearnError(
                f"layers {missing} of {self.backbone.name} did not run in its forward pass."
            )
        repeated = {name: len(calls) for name, calls in taken.items() if len(calls) > 1}
        if repeated:
            raise LtlearnError(
                f"layers {sorted(repeated)} of {self.backbone.name} run more than once per "
                f"forward pass (calls: {repeated}), so they have no single output to store. "
                "Name a submodule that runs once, such as the block that calls them."
            )
        parts = [taken[name][0] for name in self.layers] + [embedding]
        self.widths = [int(part.shape[1]) for part in parts]
        return torch.cat([part.to(embedding.dtype) for part in parts], dim=1)


def _pooled(output, name):
    """A layer's output as one vector per image: averaged over positions or tokens."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:  # (n, C, H, W)
        return output.mean(dim=(2, 3))
    if output.ndim == 3:  # (n, tokens, C)
        return output.mean(dim=1)
    if output.ndim == 2:
        return output
    raise LtlearnError(
        f"layer {name!r} returned a tensor of shape {tuple(output.shape)}; expected "
        "(n, C, H, W), (n, tokens, C) or (n, C)."
    )


def _recipe_options(name, backbone, **explicit):
    """``(layers, views, view_transform)`` of the recipe ``name``, checked against the call.

    ``explicit`` holds the call's own ``layers``, ``views``, ``view_transform``
    and ``cut``: any of them set besides the recipe is an error, since the
    file would no longer hold what the recipe's name says it holds.
    """
    from ltlearn.features.recipes import RECIPES

    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}; got {name!r}.")
    recipe = RECIPES[name]
    # None, and views=0, are the defaults: what a call that did not set them passes.
    given = {key: value for key, value in explicit.items() if value not in (None, 0)}
    if given:
        options = ", ".join(f"{key}={value!r}" for key, value in given.items())
        raise ValueError(
            f"recipe={name!r} chooses layers, views and view_transform itself and stores no "
            f"cut; it cannot be combined with {options} (--layers or --cut on the command "
            "line). Drop those, or drop the recipe and pass layers=, views= and view_transform= "
            "yourself."
        )
    module = backbone.module
    names = {n for n, _ in module.named_modules()} if isinstance(module, torch.nn.Module) else ()
    missing = [layer for layer in recipe.layers if layer not in names]
    if missing:
        raise ValueError(
            f"recipe={name!r} stores the outputs of {list(recipe.layers)}, submodules of "
            f"{recipe.backbone}; backbone {backbone.name} has no {missing}. Use the backbone "
            f"{recipe.backbone!r}, or pass layers=, views= and view_transform= for this one."
        )
    return list(recipe.layers), recipe.views, recipe.view_transform


def _check_layers(backbone, layers):
    """The requested layer names, checked against the backbone's submodules."""
    if layers is None:
        return []
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not isinstance(backbone.module, torch.nn.Module):
        raise ValueError(f"layers= needs a torch.nn.Module backbone; {backbone.name} is not one.")
    names = [name for name, _ in backbone.module.named_modules() if name]
    unknown = [name for name in layers if name not in names]
    if unknown:
        shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
        raise ValueError(
            f"layers {unknown} are not submodules of {backbone.name}; its submodules are: {shown}."
        )
    if len(set(layers)) != len(layers) or "embedding" in layers:
        raise ValueError(f"layers must be distinct submodule names; got {layers}.")
    return layers


class _Engines:
    """How each batch is embedded: float batches as preprocessed, uint8 ones per image size."""

    def __init__(self, backbone, device, onnx, onnx_path, strict, layers=(), trunk=None):
        self.backbone, self.device = backbone, device
        self.onnx, self.onnx_path, self.strict = onnx, onnx_path, strict
        self.layers, self.trunk = layers, trunk
        self.spec = getattr(backbone.preprocess, "resize_spec", lambda: None)()
        self.by_key = {}
        self.modules = []

    def __call__(self, batch):
        key = tuple(batch.shape[-2:]) if batch.dtype == torch.uint8 else "float"
        if key not in self.by_key:
            self.by_key[key] = self._make(key)
        return self.by_key[key](batch)

    @property
    def widths(self):
        """Widths of the layers and the embedding, once a torch pass has run."""
        return next((m.widths for m in self.modules if m.widths is not None), None)

    @property
    def row_shape(self):
        """Shape of one row's activations at the cut, once a torch pass has run."""
        return next((m.row_shape for m in self.modules if m.row_shape is not None), None)

    def _make(self, key):
        resize = None
        path = self.onnx_path
        if key != "float":
            size, scale, shift = self.spec
            resize = ResizeNormalize(key, size, scale, shift).to(self.device)
            path = path.with_name(f"{path.stem}.{key[0]}x{key[1]}{path.suffix}")
        module = _Embedding(self.backbone, resize, self.layers, self.trunk)
        self.modules.append(module)
        if not self.onnx:
            return module
        return _OnnxRuntime(module, path, strict=self.strict, name=self.backbone.name)


def _shard_range(n_items, shard):
    if shard is None:
        return 0, n_items
    index, count = shard
    if not (
        isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count
    ):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n; got {shard!r}.")
    return index * n_items // count, (index + 1) * n_items // count


def extract(
    source,
    backbone,
    path,
    *,
    split=None,
    batch_size=64,
    num_workers=None,
    device="auto",
    dtype="float16",
    overwrite=False,
    on_error="skip",
    shard=None,
    engine="auto",
    views=0,
    view_transform=None,
    layers=None,
    cut=None,
    recipe=None,
    random_state=None,
    compression="auto",
    verbose=True,
):
    """Embed every image of ``source`` with ``backbone`` and write them to ``path``.

    Parameters
    ----------
    source : str, path-like or torch Dataset of (PIL image, label)
        A path as the ``ltlearn extract`` command takes it (an image folder
        or ``.zip``, a CIFAR python directory, a list file; see
        :func:`~ltlearn.features.sources.open_source`), one of
        :mod:`ltlearn.features.sources`, or anything with ``classes`` and
        ``ids`` (a stable string per item; item indices are used when absent).
    backbone : str or Backbone
        A name as the command takes it (``"efficientnet-lite0"``,
        ``"open_clip:<model>:<tag>"``, ``"torchvision:<arch>:<weights file>"``,
        a TorchScript or ``torch.export`` file; see
        :func:`~ltlearn.features.backbones.load_backbone`), or a
        :class:`~ltlearn.features.backbones.Backbone`.
    path : str or path-like
        The ``.h5`` file. If it exists it is resumed (rows already done are
        skipped), provided it was written by the same backbone, weights and
        preprocessing and has the same classes; otherwise an error names the
        difference. A file that already holds the whole split is only read,
        so rerunning a finished extraction does nothing, even onto a read-only
        file. A directory or a device (``/dev/null``) is refused.
    split : str, default=None
        Group of the file the rows go to. None: the single top-level folder of
        an image folder or zip laid out as ``<split>/<class>/<file>``, else
        ``"train"``; for a CIFAR directory given as a path, also which of its
        splits is read. It names a group at the root of the file: a
        non-empty name without ``/``, other than ``.``, ``..`` and
        ``classes``.
    batch_size : int, default=64
    num_workers : int, default=None
        DataLoader worker processes. None uses none when the model runs on
        the CPU (the engine already uses every core, and a worker would only
        compete with it: 0.85x of the bare engine speed with one worker
        against 0.90x without, on 2 cores) and ``min(8, cpu count - 1)`` on a
        GPU.
    device : str, default="auto"
        Where the backbone runs; on CUDA with pinned memory and float16
        autocast.
    dtype : {"float16", "float32"}, default="float16"
        Storage type of the features.
    overwrite : bool, default=False
        Replace an existing file (atomically, when the new one is complete)
        instead of resuming it.
    on_error : {"skip", "raise"}, default="skip"
        An image that cannot be decoded is skipped with a
        :class:`CorruptImageWarning` naming it, or stops the run with an error
        naming it. Skipped ids are listed in the split's ``skipped`` attribute.
        When every image fails, nothing is written and an error names how many
        failed and the first failure.
    shard : (int, int), default=None
        ``(i, n)``: process only the i-th of n contiguous slices of the source
        (one process or GPU per shard); join the files with :func:`merge`.
    engine : {"auto", "torch", "onnxruntime"}, default="auto"
        How the backbone runs. ``"onnxruntime"`` (CPU only, the ``onnx``
        extra) exports it to ONNX once, caches the export beside ``path``
        (``<path>.onnx``), checks it against torch on the first batch, and runs
        it with onnxruntime: several times faster than eager torch on a CPU.
        ``"auto"`` is onnxruntime on the CPU when it is installed and the
        backbone is a ``torch.nn.Module``, torch otherwise. When the
        backbone's preprocessing is a PIL bicubic resize and a per-channel
        normalisation (EfficientNet-Lite0, :class:`~ltlearn.features.backbones.ImagePreprocess`)
        and a batch's images share one size, the workers send the decoded
        uint8 images and the resize runs inside the model
        (:mod:`ltlearn.features.resize`); that export is cached as
        ``<path>.<H>x<W>.onnx``. In a batch of several sizes, the workers
        resize the images to the model's input size with the same integer
        arithmetic, so an image's row never depends on its batch neighbours.
        A cached export that cannot be loaded (truncated, empty) is exported
        again, with a warning. Delete the ``.onnx`` files after a finished
        run if the disk space matters; a rerun re-exports them.
    views : int, default=0
        Augmented views per image, embedded besides the plain view and stored
        as ``/<split>/views`` (n, views, d), for estimators that use view
        agreement at test time (read them with ``FeatureFile.views``).
    view_transform : callable, default=None
        PIL image -> PIL image, a random augmentation (e.g. a torchvision
        ``RandomResizedCrop``); required when ``views > 0``. It may draw from
        torch's, Python's or NumPy's global generator: before an image's views
        are drawn, all three are seeded from ``random_state`` and the image's
        position in the source (and restored after), so that its views do not
        depend on the loader's workers, the batch size, a shard or a resumed
        run.
    layers : sequence of str, default=None
        Names of submodules of the backbone's module (as in
        ``module.named_modules()``, e.g. ``"model._blocks.10"`` for
        EfficientNet-Lite0's fifth stage) whose outputs are stored besides the
        embedding, each averaged over its spatial positions (or tokens): the
        row becomes ``[layer 1 | layer 2 | ... | embedding]``, and the file
        records each part's name and width (:attr:`FeatureFile.feature_groups`;
        ``FeatureFile.read(split, groups=[...])`` reads some of them), for
        estimators that use several depths (:class:`ltlearn.SHIKEClassifier`).
        A submodule that runs more than once per forward pass (a shared
        activation module, such as the ``relu`` of torchvision's residual
        blocks or ``model._swish`` of EfficientNet-Lite0) has no single output
        and is refused with an error naming it; name the block instead.
    cut : str, default=None
        Store the unpooled activations of this submodule instead of the
        embedding (e.g. ``"model._blocks.14"``: EfficientNet-Lite0's output
        before its last block, 192 x 7 x 7 per image): only the backbone's
        trunk up to the cut runs (:meth:`~ltlearn.features.backbones.Backbone.split`).
        Rows are stored flattened, in chunks of a few rows, with the
        activation shape and the cut recorded in the file;
        :meth:`FeatureFile.read` returns them as ``(n, C, H, W)``, ready for
        an estimator with a trainable top (:class:`ltlearn.heads.TopStage`,
        built from the same backbone and cut). Excludes ``layers``.
    recipe : {"layers-views"}, default=None
        Store what a named, measured setting needs (``--recipe`` on the
        command line; see :mod:`ltlearn.features.recipes`), recorded in the
        file's ``recipe`` attribute; read it back with
        :meth:`FeatureFile.read_with_views`. ``"layers-views"``:
        EfficientNet-Lite0's ``model._blocks.14`` and ``model._blocks.15``
        beside the embedding and 2 views per image from
        :class:`~ltlearn.features.recipes.PadCropFlip`, the setting that
        reached 78.6 % on CIFAR-10-LT at IR 100 (76.8 % without) with
        :class:`~ltlearn.BalancedSoftmaxClassifier` trained and tested on the
        views. A recipe chooses ``layers``, ``views`` and ``view_transform``
        itself: passing any of them, or ``cut``, with it is an error.
    random_state : int, RandomState instance or None, default=None
        Seeds the views (see ``view_transform``): an int gives the same views
        in every run. None draws a seed from NumPy's global generator.
    compression : {"auto", "gzip", "lzf"} or None, default="auto"
        HDF5 chunk compression of the split (rows added to a split already
        in the file keep its own).
        ``"auto"``: gzip for embeddings, none for activations at a ``cut``.
        Embeddings shrink to about 0.69 of their size; EfficientNet-Lite0's
        float16 activations at ``model._blocks.14`` only to 0.86, and
        compressing them held the extraction to 0.85 of the bare forward
        pass, against 0.95 without (``benchmarks/bench_extract.py --cut``).
    verbose : bool, default=True
        Progress bar with rate and time left.

    Returns
    -------
    path : pathlib.Path

    Examples
    --------
    A multi-depth file from a small random network (any ``torch.nn.Module``
    works through :func:`~ltlearn.features.backbones.from_module`):

    >>> import tempfile, os, torch
    >>> from torch.utils.data import TensorDataset
    >>> from ltlearn.features import FeatureFile
    >>> from ltlearn.features.backbones import from_module
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(4, 6, 3), torch.nn.AdaptiveAvgPool2d(1))
    >>> class Images(TensorDataset):
    ...     classes = ["a", "b"]
    >>> images = Images(torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1]))
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> _ = extract(images, from_module(net, preprocess=lambda x: x), path,
    ...             layers=["1"], engine="torch", verbose=False)
    >>> with FeatureFile(path) as f:
    ...     print(f.feature_groups, f.read("train", groups=["embedding"])[0].shape)
    [('1', 4), ('embedding', 6)] (5, 6)
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}.")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}; got {engine!r}.")
    if not (isinstance(views, int) and views >= 0):
        raise ValueError(f"views must be a non-negative int; got {views!r}.")
    if views and not callable(view_transform):
        raise ValueError("views > 0 needs a view_transform (PIL image -> augmented PIL image).")
    if compression not in ("auto", "gzip", "lzf", None):
        raise ValueError(f"compression must be 'auto', 'gzip', 'lzf' or None; got {compression!r}.")
    if split is not None:
        _check_split(split)
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(
            f"path {str(path)!r} exists and is not a regular file (a directory or a device); "
            "extract writes an HDF5 file: name a file such as 'features.h5'."
        )
    if isinstance(source, (str, os.PathLike)):
        from ltlearn.features.sources import open_source

        source = open_source(source, split=split or "train")
    if isinstance(backbone, str):
        from ltlearn.features.backbones import load_backbone

        backbone = load_backbone(backbone)
    if not isinstance(backbone, Backbone):
        raise TypeError(
            "backbone must be a Backbone (ltlearn.features.backbones) or a backbone name such "
            f"as 'efficientnet-lite0'; got {type(backbone).__name__}."
        )
    if recipe is not None:
        layers, views, view_transform = _recipe_options(
            recipe, backbone, layers=layers, views=views, view_transform=view_transform, cut=cut
        )
    layers = _check_layers(backbone, layers)
    trunk = None
    if cut is not None:
        if layers:
            raise ValueError("cut and layers exclude each other: a cut file stores one tensor.")
        if not isinstance(backbone.module, torch.nn.Module):
            raise ValueError(f"cut= needs a torch.nn.Module backbone; {backbone.name} is not one.")
        trunk, _ = backbone.split(cut)
    if split is None:
        split = getattr(source, "prefix", "") or "train"
        _check_split(split, f"the source's folder {split!r}, the default split name,")
    device = resolve_device(device)
    ids = getattr(source, "ids", None) or [str(i) for i in range(len(source))]
    start, stop = _shard_range(len(source), shard)
    attrs = backbone.provenance()
    if layers:
        attrs["layers"] = json.dumps(layers)
    if cut is not None:
        attrs["cut"] = cut
    if recipe is not None:
        attrs["recipe"] = recipe
    if shard is not None:
        attrs["shard"] = f"{shard[0]}/{shard[1]}"
    if not overwrite:
        _check_same_cut(path, cut)
        if _finished(path, split, source.classes, attrs, stop - start):
            return path
    mode = "w" if overwrite else "a"
    with (
        _removed_if_left_empty(path, split),
        FeatureWriter(
            path,
            classes=source.classes,
            attrs=attrs,
            mode=mode,
            dtype=dtype,
            # A cut row holds thousands of values: chunks of ~1 MB, not 1,024 rows.
            chunk_rows=1024 if cut is None else 64,
            compression=("gzip" if cut is None else None) if compression == "auto" else compression,
        ) as writer,
        contextlib.ExitStack() as stack,
    ):
        recorded = writer.progress(split)
        done = int(recorded.get("items_done", 0))
        skipped = [str(s) for s in recorded.get("skipped", [])]
        first_error = None
        if done >= stop - start:
            _check_not_all_skipped(writer, path, split, skipped, first_error)
            return path
        if num_workers is None:
            num_workers = 0 if device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))
        spec = getattr(backbone.preprocess, "resize_spec", lambda: None)()
        # scikit-learn only here: the command's start-up does not pay for it.
        from sklearn.utils import check_random_state

        view_seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
        size = None if spec is None else tuple(spec[0])
        loader = DataLoader(
            _Preprocessed(
                source,
                backbone.preprocess,
                start + done,
                stop,
                views,
                view_transform,
                size=size,
                seed=view_seed,
            ),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_Collate(size),
            pin_memory=device.type == "cuda",
        )
        if trunk is not None:
            trunk.to(device)
        elif isinstance(backbone.module, torch.nn.Module):
            stack.enter_context(_moved_to(backbone.module, device))
        embed = _Engines(
            backbone,
            device,
            onnx=_use_onnxruntime(engine, device, backbone),
            onnx_path=path.with_name(path.name + ".onnx"),
            strict=engine == "onnxruntime",
            layers=layers,
            trunk=trunk,
        )
        autocast = (
            torch.autocast("cuda", dtype=torch.float16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )
        progress = tqdm(
            total=stop - start,
            initial=done,
            desc=f"{backbone.name} -> {path.name}:{split}",
            unit="img",
            disable=not verbose,
        )
        pending = _PendingRows()
        with torch.inference_mode(), progress:
            try:
                for end, batch, labels, rows, bad in loader:
                    for index, message in bad:
                        where = f"image {ids[index]!r} (item {index})"
                        if on_error == "raise":
                            raise LtlearnError(f"Could not read {where}: {message}")
                        first_error = first_error or f"{where}: {message}"
                        warnings.warn(
                            f"Skipped {where}: {message}", CorruptImageWarning, stacklevel=2
                        )
                        skipped.append(ids[index])
                    if batch is not None:
                        batch = batch.flatten(0, 1) if views else batch  # views follow their image
                        batch = batch.to(device, non_blocking=True)
                        with autocast:
                            features = embed(batch).float().cpu().numpy()
                        if trunk is not None:
                            writer.set_row_shape(split, embed.row_shape)
                        if layers and embed.widths is not None:
                            names = [*layers, "embedding"]
                            writer.set_feature_groups(zip(names, embed.widths, strict=True))
                        extra = None
                        if views:
                            features = features.reshape(len(rows), views + 1, -1)
                            features, extra = features[:, 0], features[:, 1:]
                        pending.add(features, labels, [ids[r] for r in rows], extra)
                    if pending.due():
                        pending.write(writer, split, end - start, skipped)
                    elif not pending.rows:
                        writer.record_progress(split, items_done=end - start, skipped=skipped)
                    pending.items_done = end - start
                    progress.update(end - start - done)
                    done = end - start
            finally:
                # Rows computed before an error or an interrupt are kept.
                if pending.rows:
                    pending.write(writer, split, pending.items_done, skipped)
        _check_not_all_skipped(writer, path, split, skipped, first_error)
    return path


@contextlib.contextmanager
def _removed_if_left_empty(path, split):
    """Remove ``path`` on failure if this call created it and it records no progress.

    Such a file (e.g. after a layer refused in the first batch) would later
    read as "interrupted"; it holds nothing of the user's.
    """
    created = not path.exists()
    try:
        yield
    except BaseException:
        if created and path.exists() and _items_done(path, split) == 0:
            path.unlink()
        raise


def _items_done(path, split):
    """Items a feature file records as done in ``split`` (0 when nothing is readable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f[split].attrs.get("items_done", 0)) if split in f else 0
    except (OSError, KeyError, ValueError):  # an empty or half-created file holds nothing
        return 0


# Names the file layout (ltlearn.features.io) uses at the root of a feature file.
_ROOT_NAMES = ("classes",)


def _check_split(split, what="split"):
    """Refuse a split name that is not one HDF5 group at the root of the file."""
    if (
        not isinstance(split, str)
        or split in ("", ".", "..", *_ROOT_NAMES)
        or "/" in split
        or "\0" in split
    ):
        raise ValueError(
            f"{what} must name one group of the feature file: a non-empty string without "
            f"'/', other than '.', '..' and {list(_ROOT_NAMES)}; got {split!r}. "
            "Pass split='train' (or another name)."
        )


def _finished(path, split, classes, attrs, n_items):
    """Whether ``path`` already holds all ``n_items`` of ``split`` from this backbone and classes.

    Read-only: a finished file is left alone, even where it cannot be written.
    Anything else (incomplete, foreign, unreadable) is left to the writer,
    which resumes it or names the problem.
    """
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            group = f.get(split)
            if not isinstance(group, h5py.Group) or "classes" not in f:
                return False
            if int(group.attrs.get("n_rows", 0)) < 1:
                return False
            if int(group.attrs.get("items_done", -1)) < n_items:
                return False
            if list(f["classes"].asstr()[()]) != [str(c) for c in classes]:
                return False
            return all(
                f.attrs.get(key, value) == value for key, value in attrs.items() if key != "created"
            )
    except (OSError, TypeError, ValueError):  # not a feature file: the writer says why
        return False


def _check_same_cut(path, cut):
    """Refuse to resume a file of embeddings as activations at a cut, or the other way round.

    The writer's provenance check lets a file lack an attribute, and a file
    of embeddings has no ``cut``.
    """
    if not path.is_file():
        return
    try:
        with h5py.File(path, "r") as f:
            stored = f.attrs.get("cut") if "classes" in f else cut
    except OSError:  # not an HDF5 file: the writer says why
        return
    stored = stored.decode() if isinstance(stored, bytes) else stored
    if stored != cut:
        have = "embeddings" if stored is None else f"activations at cut={stored!r}"
        want = "embeddings" if cut is None else f"activations at cut={cut!r}"
        raise FeatureFileError(
            f"Refusing to append to {str(path)!r}: it holds {have}, this extraction writes "
            f"{want}. Write to a new file, or pass overwrite=True."
        )


def _check_not_all_skipped(writer, path, split, skipped, first_error):
    """No rows at all because every image failed to decode is an error, not a finished run."""
    if writer.n_rows(split) or not skipped:
        return
    # Forget the progress: a rerun after fixing the images starts from the first.
    writer.record_progress(split, items_done=0, skipped=[])
    first = first_error or f"image {skipped[0]!r}"
    raise LtlearnError(
        f"None of the {len(skipped)} images of split {split!r} could be read, so nothing was "
        f"written to {str(path)!r}; the first failure: {first}. Check that the "
        "source holds images that Pillow can open."
    )


@contextlib.contextmanager
def _moved_to(module, device):
    """Run ``module`` on ``device`` in eval mode, then put it back as the caller had it."""
    first = next(iter([*module.parameters(), *module.buffers()]), None)
    home = None if first is None else first.device
    training = module.training
    module.to(device).eval()
    try:
        yield module
    finally:
        module.train(training)
        if home is not None:
            module.to(home)


def _use_onnxruntime(engine, device, backbone):
    if engine == "torch":
        return False
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise ValueError("engine='onnxruntime' runs on the CPU; use device='cpu'.")
        if not isinstance(backbone.module, torch.nn.Module):
            raise ValueError("engine='onnxruntime' needs a torch.nn.Module backbone to export.")
        import_optional("onnxruntime", "onnx")
        return True
    available = importlib.util.find_spec("onnxruntime") is not None
    return available and device.type == "cpu" and isinstance(backbone.module, torch.nn.Module)
