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
import importlib.util
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
from ltlearn.features.io import FeatureFile, FeatureWriter

__all__ = ["CorruptImageWarning", "extract", "merge"]

ENGINES = ("auto", "torch", "onnxruntime")


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was skipped (``on_error="skip"``)."""


class _Preprocessed(Dataset):
    """Items ``start .. stop`` of a source, preprocessed; failures become error records."""

    def __init__(self, source, preprocess, start, stop, views=0, view_transform=None):
        self.source, self.preprocess = source, preprocess
        self.start, self.stop = start, stop
        self.views, self.view_transform = views, view_transform

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        index = self.start + i
        try:
            image, label = self.source[index]
            tensor = self.preprocess(image)
            if self.views:
                augmented = [self.preprocess(self.view_transform(image)) for _ in range(self.views)]
                tensor = torch.stack([tensor, *augmented])  # (1 + views, 3, H, W)
            return index, tensor, int(label), None
        except Exception as exc:  # any decoding problem of any image library
            return index, None, -1, f"{type(exc).__name__}: {exc}"


def _collate(items):
    good = [item for item in items if item[3] is None]
    bad = [(item[0], item[3]) for item in items if item[3] is not None]
    indices = [item[0] for item in items]
    if good:
        batch = torch.stack([item[1] for item in good])
        labels = np.array([item[2] for item in good], dtype=np.int64)
        rows = np.array([item[0] for item in good])
    else:
        batch, labels, rows = None, np.zeros(0, np.int64), np.zeros(0, np.int64)
    return max(indices) + 1, batch, labels, rows, bad


class _OnnxRuntime:
    """The backbone exported to ONNX once (cached at ``onnx_path``) and run by onnxruntime.

    Checked against torch on the first batch of every run: a stale or wrong
    cached export is re-exported, and one that still disagrees is an error.
    A model that cannot be exported is an error when onnxruntime was asked
    for (``strict``), and runs in torch with a warning when it was only the
    automatic choice.
    """

    def __init__(self, backbone, onnx_path, strict):
        self.ort = import_optional("onnxruntime", "onnx")
        self.backbone, self.path, self.strict = backbone, Path(onnx_path), strict
        self.session = None
        self.fallback = False

    def _export(self, batch):
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
            torch.onnx.export(
                _Embedding(self.backbone),
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
            return self.backbone.embed(batch)
        if self.session is None:
            # A few rows suffice to check the export; a whole eager batch costs seconds on a CPU.
            probe = batch[:4]
            reference = self.backbone.embed(probe).float()
            for attempt in ("cached", "fresh"):
                if attempt == "fresh" or not self.path.exists():
                    try:
                        self._export(batch)
                    except Exception as exc:  # exporters fail in many ways on unusual ops
                        message = f"{self.backbone.name} cannot be exported to ONNX ({exc})"
                        if self.strict:
                            raise LtlearnError(f"{message}; use engine='torch'.") from exc
                        warnings.warn(f"{message}; running it in torch.", stacklevel=3)
                        self.fallback = True
                        return self.backbone.embed(batch)
                self._open()
                out = self._run(probe)
                scale = reference.abs().max().clamp_min(1e-12)
                if out.shape == reference.shape and (out - reference).abs().max() <= 1e-3 * scale:
                    return self._run(batch)
            raise LtlearnError(
                f"The ONNX export of {self.backbone.name} ({self.path}) disagrees with torch "
                "on the first batch; use engine='torch'."
            )
        return self._run(batch)


class _Embedding(torch.nn.Module):
    """A backbone as a module that returns the embedding only (for export)."""

    def __init__(self, backbone):
        super().__init__()
        self.module = backbone.module
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.embed(x)


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
    split="train",
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
    verbose=True,
):
    """Embed every image of ``source`` with ``backbone`` and write them to ``path``.

    Parameters
    ----------
    source : torch Dataset of (PIL image, label)
        One of :mod:`ltlearn.features.sources` or anything with ``classes``
        and ``ids`` (a stable string per item; item indices are used when
        absent).
    backbone : Backbone
        From :mod:`ltlearn.features.backbones`.
    path : str or path-like
        The ``.h5`` file. If it exists it is resumed (rows already done are
        skipped), provided it was written by the same backbone, weights and
        preprocessing and has the same classes; otherwise an error names the
        difference.
    split : str, default="train"
        Group of the file the rows go to.
    batch_size : int, default=64
    num_workers : int, default=None
        DataLoader worker processes; None uses ``min(4, cpu count - 1)``.
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
    shard : (int, int), default=None
        ``(i, n)``: process only the i-th of n contiguous slices of the source
        (one process or GPU per shard); join the files with :func:`merge`.
    engine : {"auto", "torch", "onnxruntime"}, default="auto"
        How the backbone runs. ``"onnxruntime"`` (CPU only, the ``onnx``
        extra) exports it to ONNX once, caches the export beside ``path``
        (``<path>.onnx``), checks it against torch on the first batch, and runs
        it with onnxruntime: several times faster than eager torch on a CPU.
        ``"auto"`` is onnxruntime on the CPU when it is installed and the
        backbone is a ``torch.nn.Module``, torch otherwise.
    views : int, default=0
        Augmented views per image, embedded besides the plain view and stored
        as ``/<split>/views`` (n, views, d), for estimators that use view
        agreement at test time (read them with ``FeatureFile.views``).
    view_transform : callable, default=None
        PIL image -> PIL image, a random augmentation (e.g. a torchvision
        ``RandomResizedCrop``); required when ``views > 0``. It draws from
        the worker processes' random state, so views are not reproducible.
    verbose : bool, default=True
        Progress bar with rate and time left.

    Returns
    -------
    path : pathlib.Path
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}.")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}; got {engine!r}.")
    if not (isinstance(views, int) and views >= 0):
        raise ValueError(f"views must be a non-negative int; got {views!r}.")
    if views and not callable(view_transform):
        raise ValueError("views > 0 needs a view_transform (PIL image -> augmented PIL image).")
    path = Path(path)
    device = resolve_device(device)
    ids = getattr(source, "ids", None) or [str(i) for i in range(len(source))]
    start, stop = _shard_range(len(source), shard)
    attrs = backbone.provenance()
    if shard is not None:
        attrs["shard"] = f"{shard[0]}/{shard[1]}"
    mode = "w" if overwrite else "a"
    with (
        FeatureWriter(path, classes=source.classes, attrs=attrs, mode=mode, dtype=dtype) as writer,
        contextlib.ExitStack() as stack,
    ):
        recorded = writer.progress(split)
        done = int(recorded.get("items_done", 0))
        skipped = [str(s) for s in recorded.get("skipped", [])]
        if done >= stop - start:
            return path
        if num_workers is None:
            num_workers = max(0, min(4, (torch.get_num_threads() or 1) - 1))
        loader = DataLoader(
            _Preprocessed(source, backbone.preprocess, start + done, stop, views, view_transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )
        if isinstance(backbone.module, torch.nn.Module):
            stack.enter_context(_moved_to(backbone.module, device))
        embed = backbone.embed
        if _use_onnxruntime(engine, device, backbone):
            onnx_path = path.with_name(path.name + ".onnx")
            embed = _OnnxRuntime(backbone, onnx_path, strict=engine == "onnxruntime")
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
        with torch.inference_mode(), progress:
            for end, batch, labels, rows, bad in loader:
                for index, message in bad:
                    where = f"image {ids[index]!r} (item {index})"
                    if on_error == "raise":
                        raise LtlearnError(f"Could not read {where}: {message}")
                    warnings.warn(f"Skipped {where}: {message}", CorruptImageWarning, stacklevel=2)
                    skipped.append(ids[index])
                if batch is not None:
                    batch = batch.flatten(0, 1) if views else batch  # views follow their image
                    batch = batch.to(device, non_blocking=True)
                    with autocast:
                        features = embed(batch).float().cpu().numpy()
                    extra = None
                    if views:
                        features = features.reshape(len(rows), views + 1, -1)
                        features, extra = features[:, 0], features[:, 1:]
                    # items_done moves with n_rows: both are flushed by the same append.
                    writer.append(
                        split,
                        features,
                        labels,
                        ids=[ids[r] for r in rows],
                        views=extra,
                        progress={"items_done": end - start, "skipped": skipped},
                    )
                else:
                    writer.record_progress(split, items_done=end - start, skipped=skipped)
                progress.update(end - start - done)
                done = end - start
    return path


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


def merge(shards, path, *, overwrite=False):
    """Join shard files into one feature file of HDF5 virtual data sets.

    The merged file refers to the shards' rows (only complete ones) without
    copying them: keep the shard files beside it. Shards must share classes,
    feature width and provenance (apart from the ``shard`` attribute).

    Parameters
    ----------
    shards : sequence of str or path-like
        Shard files in order.
    path : str or path-like
        The merged file.
    overwrite : bool, default=False

    Returns
    -------
    path : pathlib.Path
    """
    path = Path(path)
    shards = [Path(s) for s in shards]
    if not shards:
        raise ValueError("merge needs at least one shard file.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it.")
    opened = [FeatureFile(s) for s in shards]
    try:
        first = opened[0]
        reference = {k: v for k, v in first.attrs.items() if k not in ("shard", "created")}
        for other in opened[1:]:
            if other.classes != first.classes:
                raise FeatureFileError(f"{other.path} has other classes than {first.path}.")
            attrs = {k: v for k, v in other.attrs.items() if k not in ("shard", "created")}
            if attrs != reference:
                diff = sorted(
                    k for k in set(attrs) | set(reference) if attrs.get(k) != reference.get(k)
                )
                raise FeatureFileError(
                    f"{other.path} differs from {first.path} in {diff}: not shards of one run."
                )
        splits = sorted(set().union(*(f.splits for f in opened)))
        tmp = path.with_name(f".{path.name}.tmp")
        with h5py.File(tmp, "w") as out:
            out.create_dataset(
                "classes", data=np.array(first.classes, dtype=object), dtype=h5py.string_dtype()
            )
            for key, value in reference.items():
                out.attrs[key] = value
            out.attrs["merged_from"] = [s.name for s in shards]
            for split in splits:
                parts = [(f, f.n_rows(split)) for f in opened if split in f.splits]
                total = sum(n for _, n in parts)
                group = out.create_group(split)
                for name in ("features", "labels"):
                    sample = parts[0][0]._file[split][name]
                    shape = (total, *sample.shape[1:])
                    layout = h5py.VirtualLayout(shape=shape, dtype=sample.dtype)
                    offset = 0
                    for f, n in parts:
                        if n:
                            source = h5py.VirtualSource(
                                str(Path(f.path).resolve()),
                                f"{split}/{name}",
                                shape=f._file[split][name].shape,
                            )
                            layout[offset : offset + n] = source[:n]
                        offset += n
                    group.create_virtual_dataset(name, layout)
                # Ids are variable-length strings, which virtual data sets cannot hold: copied.
                ids = np.concatenate([f.ids(split) for f, _ in parts])
                group.create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype())
                group.attrs["n_rows"] = total
        tmp.replace(path)
    finally:
        for f in opened:
            f.close()
    return path
