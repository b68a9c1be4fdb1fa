"""Exceptions and warnings raised by ltlearn."""

__all__ = [
    "DeviceError",
    "DeviceWarning",
    "FeatureFileError",
    "LtlearnError",
    "TrainingDivergedError",
]


class LtlearnError(Exception):
    """Base class of every error that ltlearn raises on purpose."""


class FeatureFileError(LtlearnError, ValueError):
    """A feature file is missing, foreign, truncated, corrupt or lacks a split.

    The message names the file and what is wrong with it.
    """


class DeviceError(LtlearnError, ValueError):
    """A torch device was requested that this machine does not have."""


class TrainingDivergedError(LtlearnError, FloatingPointError, ValueError):
    """The training loss became NaN or infinite.

    A ``ValueError`` too: it almost always comes from the data (features of
    extreme magnitude left unnormalised) or a learning rate far too large.
    """


class DeviceWarning(UserWarning):
    """Work ran on another device than the one a model was trained on."""
