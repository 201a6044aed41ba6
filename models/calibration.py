"""Calibration: turning a head's logits into probabilities that mean what they say.

Temperature scaling divides the logits by one scalar. That is enough for a head trained
with label smoothing, but a head trained on hard labels ranks better and is calibrated
worse in ways one scalar cannot mend: its wide margins are overconfident while its narrow
ones are underconfident, and its runner-up styles take probability its first choice has
earned. So the temperature here grows with each row's margin (its top logit over the mean
logit), and the top logit may get a bonus:

    p = softmax((z + winner_bonus * [z_j is the top logit]) / T(z))
    T(z) = temperature + margin_slope * (max(z) - mean(z))

With margin_slope and winner_bonus 0 this is plain temperature scaling. T is one positive
number per row and the bonus is never negative, so calibration never changes the order of
the styles: top-k accuracy is the head's own.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass
from typing import Any

import numpy as np
from keras import ops
from scipy.optimize import minimize

BOUNDS = {"temperature": (0.05, 20.0), "margin_slope": (0.0, 5.0), "winner_bonus": (0.0, 10.0)}


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    margin_slope: float = 0.0
    winner_bonus: float = 0.0

    def probabilities(self, logits):
        """softmax of the calibrated logits, in Keras ops: the bundle's classifier and
        training's scores share this one definition, so the confidence the pipeline prints
        is the one the manifest reports."""
        boosted, temperatures = self._boosted_and_temperatures(logits)
        return ops.softmax(boosted / temperatures, axis=-1)

    def _boosted_and_temperatures(self, logits):
        top = ops.max(logits, axis=-1, keepdims=True)
        is_top = ops.cast(ops.greater_equal(logits, top), ops.dtype(logits))
        margin = top - ops.mean(logits, axis=-1, keepdims=True)
        return logits + self.winner_bonus * is_top, self.temperature + self.margin_slope * margin

    def negative_log_likelihood(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return _negative_log_likelihood_and_gradient(self, logits, labels)[0]

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> Calibration:
        """The calibration minimising the negative log-likelihood of held-out labels
        (a proper score: it rewards confidence that is right, not only accuracy)."""
        logits = np.asarray(logits, dtype=np.float64)
        fitted = minimize(
            lambda params: _negative_log_likelihood_and_gradient(cls(*params), logits, labels),
            x0=astuple(cls()),
            jac=True,
            method="L-BFGS-B",
            bounds=list(BOUNDS.values()),
        )
        return cls(*(float(p) for p in fitted.x))

    @classmethod
    def of(cls, head_manifest: dict[str, Any]) -> Calibration:
        """A bundle's calibration; bundles from before the margin and the bonus name only the
        temperature."""
        return cls(**{name: head_manifest[name] for name in BOUNDS if name in head_manifest})

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _negative_log_likelihood_and_gradient(
    calibration: Calibration, logits: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray]:
    """Mean -log p(label) and its gradient in (temperature, margin_slope, winner_bonus).

    With u = z' / T per row (z' the boosted logits): d(-log p_y)/dT = (z'_y - E_p[z']) / T^2,
    T moving one for one with temperature and margin times one with margin_slope; and
    d(-log p_y)/d(winner_bonus) = (p_top - [y is the top]) / T.
    """
    boosted, temperatures = (
        ops.convert_to_numpy(a) for a in calibration._boosted_and_temperatures(logits)
    )
    temperatures = temperatures[:, 0]
    log_probs = _log_softmax(boosted / temperatures[:, None])
    probs, rows, top = np.exp(log_probs), np.arange(len(labels)), logits.argmax(axis=1)
    by_temperature = (boosted[rows, labels] - (probs * boosted).sum(axis=1)) / temperatures**2
    margin = logits.max(axis=1) - logits.mean(axis=1)
    by_bonus = (probs[rows, top] - (labels == top)) / temperatures
    gradient = np.array([by_temperature.mean(), (by_temperature * margin).mean(), by_bonus.mean()])
    return float(-log_probs[rows, labels].mean()), gradient


def _log_softmax(scaled: np.ndarray) -> np.ndarray:
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
