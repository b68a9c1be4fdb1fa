"""Labelled image sets that :func:`ltlearn.features.extract` reads.

Every source is a torch ``Dataset`` whose items are ``(image, label)`` with a
PIL image, and has ``classes`` (names in label order), ``labels`` (one int per
item) and ``ids`` (a stable string per item: its path, or ``split/index``),
which the feature file stores so that rows can be matched back to images.
"""

import os
import pickle
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from torch.utils.data import Dataset

from ltlearn._optional import import_optional

__all__ = [
    "CIFARSource",
    "ImageFolderSource",
    "ListFileSource",
    "TorchDatasetSource",
    "open_source",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _pil():
    # Pillow comes with torchvision; name the extra that brings both.
    return import_optional("PIL.Image", "extract")


def _open_rgb(data_or_path):
    Image = _pil()
    image = Image.open(data_or_path)
    image.load()  # decode now, so that a corrupt file fails here and not later
    return image.convert("RGB")


def _class_pairs(names, prefix):
    """``(name, class)`` of the images laid out as ``[prefix/]<class>/<file>``."""
    pairs = []
    for name in names:
        path = PurePosixPath(name)
        if prefix is not None:
            if not path.is_relative_to(prefix):
                continue
            path = path.relative_to(prefix)
        if len(path.parts) == 2:
            pairs.append((name, path.parts[0]))
    return pairs


def open_source(spec, *, split="train", prefix=None, list_file=False, root=None):
    """An image source from a path, as the ``ltlearn extract`` command opens it.

    Parameters
    ----------
    spec : str or path-like
        An image folder or ``.zip`` (``<class>/<file>``, optionally under one
        top-level folder), a CIFAR python directory (recognised by its
        complete set of files, see :class:`CIFARSource`), or a list file of
        ``path label`` lines (``.txt``, or ``list_file=True``).
    split : str, default="train"
        For a CIFAR directory, which of its splits (``"train"`` or ``"test"``).
    prefix : str, default=None
        Folder inside an image folder or zip that holds the class folders.
    list_file : bool, default=False
        Read ``spec`` as a list file whatever its suffix.
    root : str or path-like, default=None
        Directory the paths of a list file are relative to.

    Returns
    -------
    source : ImageFolderSource, CIFARSource or ListFileSource
    """
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"Image source {str(path)!r} does not exist.")
    if list_file or path.suffix == ".txt":
        return ListFileSource(path, root=root)
    if path.is_dir() and CIFARSource._find(path) is not None:
        return CIFARSource(path, split=split if split in ("train", "test") else "train")
    return ImageFolderSource(path, prefix=prefix or "")


def _folder_files(root):
    """Paths (POSIX, relative to ``root``) of the files under ``root``.

    Links are followed only where they stay inside ``root``: a folder from
    elsewhere must not make extraction read (and embed) files outside it.
    Linked directories are not descended into (their targets, inside
    ``root``, are walked anyway).
    """
    inside = root.resolve()
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                # DirEntry answers from the directory listing: no stat per file.
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if not target.is_relative_to(inside):
                        raise ValueError(
                            f"{entry.path!r} in the image folder {str(root)!r} is a link to "
                            f"{str(target)!r}, outside the folder; links out of an image folder "
                            "are refused. Copy the images into the folder, or list them in a "
                            "list file of 'path label' lines (ListFileSource), which may point "
                            "anywhere."
                        )
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file():
                    yield Path(entry.path).relative_to(root).as_posix()


class ImageFolderSource(Dataset):
    """Images stored as ``<root>/<class>/<file>``, in a directory or a zip file.

    Classes are the sorted sub-directory names; inside a zip file nothing is
    unpacked (each worker process opens the archive itself).

    What is refused, with an error naming it: images laid out both as
    ``<class>/<file>`` and as ``<split>/<class>/<file>`` without a
    ``prefix`` to choose (one layout would be silently dropped); zip entries
    with an absolute path or a ``..`` component; in a directory, links
    (symbolic) to files or folders outside it. Links that stay inside the
    directory are followed for files; linked folders are not descended into.

    Parameters
    ----------
    root : str or path-like
        A directory, or a ``.zip`` file.
    prefix : str, default=""
        Folder inside ``root`` holding the class folders, e.g. ``"test"`` for
        a zip laid out as ``test/<class>/<file>``. When empty and ``root``
        holds a single top-level folder of class folders, that folder is used
        (and recorded as ``prefix``).

    Examples
    --------
    >>> import tempfile, os
    >>> from PIL import Image
    >>> root = tempfile.mkdtemp()
    >>> for c in ("cat", "dog"):
    ...     os.makedirs(os.path.join(root, c))
    ...     Image.new("RGB", (4, 4)).save(os.path.join(root, c, "0.png"))
    >>> source = ImageFolderSource(root)
    >>> source.classes, source.ids, source.labels.tolist()
    (['cat', 'dog'], ['cat/0.png', 'dog/0.png'], [0, 1])
    """

    def __init__(self, root, prefix=""):
        self.root = Path(root)
        prefix = PurePosixPath(prefix) if prefix else None
        if not self.root.exists():
            raise FileNotFoundError(f"Image folder {str(self.root)!r} does not exist.")
        self.is_zip = self.root.is_file()
        if self.is_zip:
            if not zipfile.is_zipfile(self.root):
                raise ValueError(f"{str(self.root)!r} is a file but not a zip archive.")
            with zipfile.ZipFile(self.root) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
        else:
            names = list(_folder_files(self.root))
        images = [n for n in sorted(names) if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS]
        for name in images:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts:
                raise ValueError(
                    f"{str(self.root)!r} holds the entry {name!r}, which points outside the "
                    "archive (an absolute path or a '..' component); refusing to read it. "
                    "Repack the archive with paths relative to its top."
                )
        pairs = _class_pairs(images, prefix)
        # Three-part paths under one top-level folder: <split>/<class>/<file>.
        nested = [n for n in images if len(PurePosixPath(n).parts) == 3]
        tops = sorted({PurePosixPath(n).parts[0] for n in nested})
        if pairs and nested and prefix is None:
            raise ValueError(
                f"{str(self.root)!r} holds images laid out both as <class>/<file> (e.g. "
                f"{pairs[0][0]!r}) and as <split>/<class>/<file> (e.g. {nested[0]!r}), so "
                f"which are the classes is ambiguous. Pass prefix= one of the folders {tops} "
                "(--prefix on the command line) to read that split, or keep one layout."
            )
        if not pairs and prefix is None and len(tops) == 1:
            prefix = PurePosixPath(tops[0])
            pairs = _class_pairs(images, prefix)
        if not pairs:
            where = f"{self.root}/{prefix}" if prefix else str(self.root)
            hint = ""
            if tops:
                hint = (
                    f" Its images lie under the folders {tops}: pass prefix= one of them "
                    "(--prefix on the command line)."
                )
            raise ValueError(f"No images laid out as <class>/<file> found in {where!r}.{hint}")
        self.prefix = "" if prefix is None else str(prefix)
        self.classes = sorted({c for _, c in pairs})
        index = {c: i for i, c in enumerate(self.classes)}
        self.ids = [name for name, _ in pairs]
        self.labels = np.array([index[c] for _, c in pairs], dtype=np.int64)
        self._archive = None
        self._archive_pid = None

    def __len__(self):
        return len(self.ids)

    def _member(self, name):
        # A ZipFile handle must not cross a fork: each worker opens its own.
        if self._archive is None or self._archive_pid != os.getpid():
            self._archive = zipfile.ZipFile(self.root)
            self._archive_pid = os.getpid()
        return self._archive.open(name)

    def __getitem__(self, i):
        name = self.ids[i]
        source = self._member(name) if self.is_zip else self.root / name
        return _open_rgb(source), int(self.labels[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_archive"] = None
        return state


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that CIFAR data does not use."""


# What unpickling a numpy array or scalar calls, taken from numpy itself; the
# pickles name it under numpy.core (numpy 1) or numpy._core (numpy 2).
_ARRAY_GLOBALS = {
    (f"numpy.{core}.{module}", function.__name__): function
    for core in ("core", "_core")
    for module, function in (
        ("multiarray", np.zeros(0).__reduce__()[0]),
        ("multiarray", np.int64(0).__reduce__()[0]),
        ("numeric", np.zeros(0).__reduce_ex__(5)[0]),  # pickle protocol 5
    )
}
_ARRAY_GLOBALS |= {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _CIFARUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, str, bytes, numbers and numpy arrays, and nothing else.

    A pickle runs code only through the globals it names; admitting only
    numpy's array and scalar reconstruction leaves it none to run.
    """

    def find_class(self, module, name):
        if (module, name) in _ARRAY_GLOBALS:
            return _ARRAY_GLOBALS[module, name]
        raise _RefusedGlobal(f"the global {module}.{name}")


class CIFARSource(Dataset):
    """CIFAR-10 or CIFAR-100 in the python pickle format (``cifar-10-batches-py/``, ...).

    Parameters
    ----------
    root : str or path-like
        The ``cifar-10-batches-py`` or ``cifar-100-python`` directory (as
        torchvision downloads it), or a directory that holds one of them.
    split : {"train", "test"}, default="train"
    download : bool, default=False
        Download the data with torchvision into ``root`` when it is missing;
        offline this fails with a message saying where to put the files.
    variant : {"cifar10", "cifar100"}, default=None
        Which one to download; when reading, it is recognised from the files.

    Notes
    -----
    A directory is CIFAR data only with every file of the layout, as regular
    files: ``batches.meta``, ``data_batch_1`` .. ``data_batch_5`` and
    ``test_batch`` (CIFAR-10), or ``meta``, ``train`` and ``test``
    (CIFAR-100). The pickles are read by an unpickler that admits only
    dicts, lists, strings, numbers and numpy arrays, so a planted pickle
    cannot run code: it is an error naming the file.
    """

    _DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

    def __init__(self, root, split="train", *, download=False, variant=None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
        root = Path(root)
        directory = self._find(root)
        if directory is None and download:
            self._download(root, variant)
            directory = self._find(root)
        if directory is None:
            raise FileNotFoundError(
                f"No CIFAR data in {str(root)!r}: expected a 'cifar-10-batches-py' or "
                "'cifar-100-python' directory (the python version from "
                "https://www.cs.toronto.edu/~kriz/cifar.html), or pass download=True when online."
            )
        self.split = split
        if self._complete(directory, self._CIFAR10):
            meta, label_key = self._load(directory / "batches.meta", "label_names"), "labels"
            names = meta["label_names"]
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        else:
            meta, label_key = self._load(directory / "meta", "fine_label_names"), "fine_labels"
            names = meta["fine_label_names"]
            files = [split]
        images, labels = [], []
        for name in files:
            batch = self._load(directory / name, "data", label_key)
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[label_key])
        self.images = np.concatenate(images).transpose(0, 2, 3, 1)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = [str(n) for n in names]
        self.ids = [f"{split}/{i:05d}" for i in range(len(self.labels))]

    # The files of each layout, all regular files: a folder that merely holds
    # something called "meta" is not CIFAR data (and is never unpickled).
    _CIFAR10 = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
    _CIFAR100 = ("meta", "train", "test")

    @staticmethod
    def _complete(directory, layout):
        return all((directory / name).is_file() for name in layout)

    @classmethod
    def _find(cls, root):
        for candidate in (root, *(root / d for d in cls._DIRS.values())):
            if any(cls._complete(candidate, layout) for layout in (cls._CIFAR10, cls._CIFAR100)):
                return candidate
        return None

    @staticmethod
    def _load(path, *keys):
        if not path.exists():
            raise FileNotFoundError(f"CIFAR file {str(path)!r} is missing.")
        with open(path, "rb") as f:
            try:
                raw = _CIFARUnpickler(f, encoding="bytes").load()
            except _RefusedGlobal as exc:
                raise ValueError(
                    f"CIFAR file {str(path)!r} refers to {exc}, which CIFAR data never does; "
                    "refusing to load it (unpickling it could run code). Download the data "
                    "again from https://www.cs.toronto.edu/~kriz/cifar.html."
                ) from None
            except Exception as exc:  # truncated or garbled: pickle raises many types
                raise ValueError(
                    f"CIFAR file {str(path)!r} cannot be read as a CIFAR pickle ({exc})."
                ) from exc
        if not isinstance(raw, dict):
            raise ValueError(
                f"CIFAR file {str(path)!r} holds a {type(raw).__name__}, not a CIFAR dict."
            )
        data = {}
        for key, value in raw.items():
            key = key.decode() if isinstance(key, bytes) else key
            if key.endswith("label_names") or key == "filenames":
                value = [v.decode() if isinstance(v, bytes) else v for v in value]
            data[key] = value
        missing = [key for key in keys if key not in data]
        if missing:
            raise ValueError(f"CIFAR file {str(path)!r} lacks the entries {missing}.")
        return data

    @classmethod
    def _download(cls, root, variant):
        datasets = import_optional("torchvision.datasets", "torchvision")
        make = datasets.CIFAR100 if variant == "cifar100" else datasets.CIFAR10
        try:
            make(str(root), download=True)
        except Exception as exc:  # torchvision raises URLError, OSError, RuntimeError ...
            raise ConnectionError(
                f"Could not download {variant or 'cifar10'} into {str(root)!r} ({exc}). "
                f"Offline, copy the '{cls._DIRS[variant or 'cifar10']}' directory there yourself."
            ) from exc

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return _pil().fromarray(self.images[i]), int(self.labels[i])


class ListFileSource(Dataset):
    """Images listed in a text file of ``path label`` lines (ImageNet-LT, Places-LT, iNaturalist).

    Parameters
    ----------
    list_file : str or path-like
        One ``relative/path.jpg <int label>`` per line; blank lines are ignored.
    root : str or path-like, default=None
        Directory the paths are relative to; by default the list file's.
    classes : sequence of str, default=None
        Class names in label order; by default the labels as strings, up to
        the largest label.
    """

    def __init__(self, list_file, root=None, *, classes=None):
        list_file = Path(list_file)
        if not list_file.exists():
            raise FileNotFoundError(f"List file {str(list_file)!r} does not exist.")
        self.root = Path(root) if root is not None else list_file.parent
        ids, labels = [], []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise ValueError(
                    f"{list_file}:{number}: expected 'path label' with a non-negative integer "
                    f"label; got {line!r}."
                )
            ids.append(parts[0])
            labels.append(int(parts[1]))
        if not ids:
            raise ValueError(f"List file {str(list_file)!r} lists no images.")
        self.ids = ids
        self.labels = np.asarray(labels, dtype=np.int64)
        n_classes = int(self.labels.max()) + 1
        if classes is None:
            classes = [str(c) for c in range(n_classes)]
        elif len(classes) < n_classes:
            raise ValueError(
                f"classes names {len(classes)} classes but labels go up to {n_classes - 1}."
            )
        self.classes = [str(c) for c in classes]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return _open_rgb(self.root / self.ids[i]), int(self.labels[i])


class TorchDatasetSource(Dataset):
    """Any torch ``Dataset`` of ``(PIL image, int label)`` items.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
    classes : sequence of str, default=None
        Class names; by default ``dataset.classes``.
    ids : sequence of str, default=None
        One id per item; by default the item's index.
    """

    def __init__(self, dataset, classes=None, ids=None):
        self.dataset = dataset
        classes = getattr(dataset, "classes", None) if classes is None else classes
        if classes is None:
            raise ValueError("Pass classes=...: the dataset has no 'classes' attribute.")
        self.classes = [str(c) for c in classes]
        self.ids = [str(i) for i in range(len(dataset))] if ids is None else [str(i) for i in ids]
        if len(self.ids) != len(dataset):
            raise ValueError(f"ids has {len(self.ids)} entries for {len(dataset)} items.")
        targets = getattr(dataset, "targets", None)
        self.labels = None if targets is None else np.asarray(targets, dtype=np.int64)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, int(label)
