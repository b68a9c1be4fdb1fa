"""Feature files and feature extraction.

Read, write and merge cached embeddings in ltlearn's HDF5 layout
(:mod:`ltlearn.features.io`), and make them: run a frozen backbone
(:mod:`ltlearn.features.backbones`) over an image set
(:mod:`ltlearn.features.sources`) with :func:`extract`.
"""

from ltlearn.features.extract import CorruptImageWarning, extract
from ltlearn.features.io import (
    FeatureFile,
    FeatureSplit,
    FeatureWriter,
    merge,
    read_features,
    read_metadata,
    write_features,
)

__all__ = [
    "CorruptImageWarning",
    "FeatureFile",
    "FeatureSplit",
    "FeatureWriter",
    "extract",
    "merge",
    "read_features",
    "read_metadata",
    "write_features",
]
