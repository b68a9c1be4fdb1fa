"""ltlearn: long-tailed classification on frozen features.

Estimators follow the scikit-learn API and train small torch heads on cached
embeddings, on a GPU when there is one and on the CPU otherwise.

The estimators are imported on first use (``from ltlearn import
BalancedSoftmaxClassifier`` loads torch and scikit-learn then), so that
``import ltlearn``, ``ltlearn --version`` and the feature-file readers start
without paying for torch.
"""

import importlib

__version__ = "0.1.0"

_ESTIMATORS = {
    "BalancedSoftmaxClassifier": "ltlearn.balanced_softmax",
    "DecoupledClassifier": "ltlearn.decoupled",
    "LongTailTemperatureScaler": "ltlearn.calibration",
    "PRLClassifier": "ltlearn.prl",
    "RIDEClassifier": "ltlearn.ride",
    "SADEClassifier": "ltlearn.sade",
    "SHIKEClassifier": "ltlearn.shike",
    "TopStage": "ltlearn.top_stage",
}

__all__ = [*_ESTIMATORS, "__version__"]


def __getattr__(name):
    if name in _ESTIMATORS:
        value = getattr(importlib.import_module(_ESTIMATORS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ltlearn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_ESTIMATORS])
