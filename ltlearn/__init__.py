"""ltlearn: long-tailed classification on frozen features.

Estimators follow the scikit-learn API and train small torch heads on cached
embeddings, on a GPU when there is one and on the CPU otherwise.
"""

from ltlearn.balanced_softmax import BalancedSoftmaxClassifier
from ltlearn.calibration import LongTailTemperatureScaler
from ltlearn.prl import PRLClassifier
from ltlearn.sade import SADEClassifier

__version__ = "0.1.0"

__all__ = [
    "BalancedSoftmaxClassifier",
    "LongTailTemperatureScaler",
    "PRLClassifier",
    "SADEClassifier",
    "__version__",
]
