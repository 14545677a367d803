"""Generation-length predictor (DESIGN section 2.1): embeddings + random forest + continual learning.

Public API: ``LengthPredictor`` with ``PredictorConfig``, ``PredictInput`` and ``Prediction``;
``ModelMismatchError`` when a model or training-set file does not fit the configured embedder.
"""

from predictor.predictor import (
    LengthPredictor,
    PredictInput,
    Prediction,
    PredictorConfig,
    select_for_training,
)
from predictor.trainset import ModelMismatchError

__all__ = [
    "LengthPredictor",
    "ModelMismatchError",
    "PredictInput",
    "Prediction",
    "PredictorConfig",
    "select_for_training",
]
