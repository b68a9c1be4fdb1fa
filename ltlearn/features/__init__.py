"""Feature files: read and write cached embeddings in ltlearn's HDF5 layout."""

from ltlearn.features.io import (
    FeatureFile,
    FeatureWriter,
    read_features,
    read_metadata,
    write_features,
)

__all__ = ["FeatureFile", "FeatureWriter", "read_features", "read_metadata", "write_features"]
