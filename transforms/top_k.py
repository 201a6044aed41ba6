"""The top styles of one image's probabilities: the fields that the pipeline's rows
(transforms/predictions.py) and the service's answers share. Imports no Beam."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def top_k_fields(
    probabilities: np.ndarray, *, classes: Sequence[str], top_k: int
) -> dict[str, Any]:
    """style, confidence, top_k_styles and top_k_probabilities, the most likely first (ties in the
    classes' order)."""
    ranked = np.argsort(-probabilities, kind="stable")[:top_k]
    return {
        "style": classes[ranked[0]],
        "confidence": float(probabilities[ranked[0]]),
        "top_k_styles": [classes[i] for i in ranked],
        "top_k_probabilities": [float(probabilities[i]) for i in ranked],
    }
