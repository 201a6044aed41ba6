"""Calibration: turning a head's logits into probabilities that mean what they say.

Temperature scaling divides the logits by one scalar. That is enough for a head trained
with label smoothing, but a head trained on hard labels ranks better and is calibrated
worse in a way one scalar cannot mend: its wide margins are overconfident while its narrow
ones are underconfident. So the temperature here grows with each row's margin (its top
logit over the mean logit):

    T(z) = temperature + margin_slope * (max(z) - mean(z))

With margin_slope 0 this is plain temperature scaling. T is one positive number per row,
so it never changes the order of the styles: top-k accuracy is the head's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from keras import ops
from scipy.optimize import minimize

TEMPERATURE_BOUNDS = (0.05, 20.0)
MARGIN_SLOPE_BOUNDS = (0.0, 5.0)


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    margin_slope: float = 0.0

    def probabilities(self, logits):
        """softmax(logits / T(logits)), in Keras ops: the bundle's classifier and training's
        scores share this one definition, so the confidence the pipeline prints is the one
        the manifest reports."""
        return ops.softmax(logits / self._temperatures(logits, ops), axis=-1)

    def _temperatures(self, logits, xp):
        margin = xp.max(logits, axis=-1, keepdims=True) - xp.mean(logits, axis=-1, keepdims=True)
        return self.temperature + self.margin_slope * margin

    def negative_log_likelihood(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return _negative_log_likelihood_and_gradient(self, logits, labels)[0]

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> Calibration:
        """The calibration minimising the negative log-likelihood of held-out labels
        (a proper score: it rewards confidence that is right, not only accuracy)."""
        logits = np.asarray(logits, dtype=np.float64)
        fitted = minimize(
            lambda params: _negative_log_likelihood_and_gradient(cls(*params), logits, labels),
            x0=[1.0, 0.0],
            jac=True,
            method="L-BFGS-B",
            bounds=[TEMPERATURE_BOUNDS, MARGIN_SLOPE_BOUNDS],
        )
        return cls(*(float(p) for p in fitted.x))

    @classmethod
    def of(cls, head_manifest: dict[str, Any]) -> Calibration:
        """A bundle's calibration; bundles written before the margin term have none."""
        return cls(head_manifest["temperature"], head_manifest.get("margin_slope", 0.0))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _negative_log_likelihood_and_gradient(
    calibration: Calibration, logits: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray]:
    """Mean -log p(label) and its gradient in (temperature, margin_slope).

    With u = z / T per row, d(-log p_y)/dT = (z_y - E_p[z]) / T^2, and T moves one for one
    with temperature and margin times one with margin_slope.
    """
    temperatures = calibration._temperatures(logits, np)
    scaled = logits / temperatures
    scaled -= scaled.max(axis=1, keepdims=True)
    log_probs = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    expected_logit = (np.exp(log_probs) * logits).sum(axis=1)
    per_row = (logits[rows, labels] - expected_logit) / temperatures[:, 0] ** 2
    margin = logits.max(axis=1) - logits.mean(axis=1)
    gradient = np.array([per_row.mean(), (per_row * margin).mean()])
    return float(-log_probs[rows, labels].mean()), gradient
