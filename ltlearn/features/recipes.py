"""Named extraction recipes: what a measured setting needs stored, under one name.

``extract(..., recipe=NAME)`` and ``ltlearn extract --recipe NAME`` store the
layers and augmented views a recipe uses; the file records the name in its
``recipe`` attribute, and :meth:`~ltlearn.features.FeatureFile.read_with_views`
reads rows, labels and views back in the form the estimators' ``fit(X, y,
views=...)`` and ``predict(X, views=...)`` take.

``"layers-views"``
    EfficientNet-Lite0's blocks 14 and 15 (its last two stages, 192 and 320
    channels, pooled) beside the 1,280-d embedding, and 2 augmented views of
    each image (:class:`PadCropFlip`). Trained and tested on the views, a
    :class:`~ltlearn.BalancedSoftmaxClassifier` with its defaults reached
    78.6 % balanced accuracy on CIFAR-10-LT at imbalance ratio 100 (5 seeds,
    ``benchmarks/bench_accuracy.py``; :class:`~ltlearn.PRLClassifier` 78.8 %),
    against 76.8 % on the embedding alone: the best measured setting on
    frozen features. The name says what the file holds rather than "best":
    it was measured on one data set and backbone only.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ltlearn._optional import import_optional

__all__ = ["RECIPES", "PadCropFlip", "Recipe"]


class PadCropFlip:
    """Random crop of a reflect-padded image back to its own size, then a random mirror.

    On CIFAR's 32-pixel images this is torchvision's ``RandomCrop(32,
    padding=4, padding_mode="reflect")`` followed by
    ``RandomHorizontalFlip()``, drawing the same random numbers in the same
    order: the augmentation chosen on validation for the ``"layers-views"``
    recipe (it beat a flip alone and random resized crops). Other sizes are
    padded by the same fraction of the shorter side. Draws from torch's random
    state, as torchvision does, so each loader worker draws its own.

    Parameters
    ----------
    padding : float, default=0.125
        Padding on every side as a fraction of the shorter side (0.125: 4
        pixels on 32), at most one pixel less than that side.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> image = Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8))
    >>> PadCropFlip()(image).size
    (48, 32)
    """

    def __init__(self, padding=0.125):
        if not (isinstance(padding, (int, float)) and 0 <= padding < 1):
            raise ValueError(f"padding must be a fraction in [0, 1); got {padding!r}.")
        self.padding = padding

    def __call__(self, image):
        pixels = np.asarray(image)
        height, width = pixels.shape[:2]
        pad = min(round(self.padding * min(height, width)), min(height, width) - 1)
        padded = np.pad(pixels, [(pad, pad), (pad, pad)] + [(0, 0)] * (pixels.ndim - 2), "reflect")
        # The order of torchvision's draws: row offset, column offset, then the flip.
        top = int(torch.randint(0, 2 * pad + 1, size=(1,)).item())
        left = int(torch.randint(0, 2 * pad + 1, size=(1,)).item())
        crop = padded[top : top + height, left : left + width]
        if torch.rand(1) < 0.5:
            crop = crop[:, ::-1]
        # Pillow is optional (the extract extra); a PIL image in hand means it is installed.
        return import_optional("PIL.Image", "extract").fromarray(np.ascontiguousarray(crop))

    def __repr__(self):
        return f"PadCropFlip(padding={self.padding!r})"


@dataclass(frozen=True)
class Recipe:
    """What a recipe stores: pooled layers beside the embedding, augmented views.

    Attributes
    ----------
    layers : tuple of str
        Submodules of the backbone's module (``extract(layers=...)``).
    views : int
        Augmented views per image (``extract(views=...)``).
    view_transform : callable
        PIL image -> augmented PIL image (``extract(view_transform=...)``).
    backbone : str
        The backbone the layer names belong to.
    """

    layers: tuple
    views: int
    view_transform: object
    backbone: str


RECIPES = {
    "layers-views": Recipe(
        layers=("model._blocks.14", "model._blocks.15"),
        views=2,
        view_transform=PadCropFlip(),
        backbone="efficientnet-lite0",
    ),
}
