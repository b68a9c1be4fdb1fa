"""Exceptions and warnings raised by ltlearn."""

__all__ = ["DeviceError", "DeviceWarning", "FeatureFileError", "LtlearnError"]


class LtlearnError(Exception):
    """Base class of every error that ltlearn raises on purpose."""


class FeatureFileError(LtlearnError, ValueError):
    """A feature file is missing, foreign, truncated, corrupt or lacks a split.

    The message names the file and what is wrong with it.
    """


class DeviceError(LtlearnError, ValueError):
    """A torch device was requested that this machine does not have."""


class DeviceWarning(UserWarning):
    """Work ran on another device than the one a model was trained on."""
