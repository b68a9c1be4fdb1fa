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
        top-level folder), a CIFAR python directory, or a list file of
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


class ImageFolderSource(Dataset):
    """Images stored as ``<root>/<class>/<file>``, in a directory or a zip file.

    Classes are the sorted sub-directory names; inside a zip file nothing is
    unpacked (each worker process opens the archive itself).

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
            names = [
                str(PurePosixPath(Path(dirpath, f).relative_to(self.root)))
                for dirpath, _, files in os.walk(self.root)
                for f in files
            ]
        images = [n for n in sorted(names) if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS]
        pairs = _class_pairs(images, prefix)
        # Three-part paths under one top-level folder: <split>/<class>/<file>.
        tops = sorted(
            {PurePosixPath(n).parts[0] for n in images if len(PurePosixPath(n).parts) == 3}
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
        if (directory / "batches.meta").exists():
            meta, label_key = self._load(directory / "batches.meta"), "labels"
            names = meta["label_names"]
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        else:
            meta, label_key = self._load(directory / "meta"), "fine_labels"
            names = meta["fine_label_names"]
            files = [split]
        images, labels = [], []
        for name in files:
            batch = self._load(directory / name)
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[label_key])
        self.images = np.concatenate(images).transpose(0, 2, 3, 1)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = [str(n) for n in names]
        self.ids = [f"{split}/{i:05d}" for i in range(len(self.labels))]

    @classmethod
    def _find(cls, root):
        for candidate in (root, *(root / d for d in cls._DIRS.values())):
            if (candidate / "batches.meta").exists() or (candidate / "meta").exists():
                return candidate
        return None

    @staticmethod
    def _load(path):
        if not path.exists():
            raise FileNotFoundError(f"CIFAR file {str(path)!r} is missing.")
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
        data = {}
        for key, value in raw.items():
            key = key.decode() if isinstance(key, bytes) else key
            if key.endswith("label_names") or key == "filenames":
                value = [v.decode() if isinstance(v, bytes) else v for v in value]
            data[key] = value
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
