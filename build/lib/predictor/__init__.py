"""Generation-length predictor (DESIGN section 2.1): embeddings + random forest + continual learning.

Public API: ``LengthPredictor`` with ``PredictorConfig``, ``PredictInput`` and ``Prediction``;
``ModelMismatchError`` when a model or training-set file does not fit the configured embedder.
The names load on first use, so importing ``predictor.types`` (the scheduler does) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LengthPredictor": "predictor.predictor",
    "PredictorConfig": "predictor.predictor",
    "select_for_training": "predictor.predictor",
    "PredictInput": "predictor.types",
    "Prediction": "predictor.types",
    "ModelMismatchError": "predictor.trainset",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'predictor' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
