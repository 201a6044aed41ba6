"""Calibration: recovering known distortions of honest probabilities, without reordering."""

import numpy as np
import pytest
from keras import ops

from models.calibration import Calibration


def honest_labels(true_logits: np.ndarray, seed: int = 1) -> np.ndarray:
    """Labels drawn from softmax(true_logits): those logits are calibrated by construction."""
    probabilities = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    draws = np.random.default_rng(seed).uniform(size=(len(true_logits), 1))
    return (draws > probabilities.cumsum(axis=1)).sum(axis=1)


def test_a_uniform_sharpening_is_plain_temperature_scaling():
    true_logits = np.random.default_rng(0).normal(size=(4000, 4))
    fitted = Calibration.fit(true_logits * 3.0, honest_labels(true_logits))
    assert fitted.temperature == pytest.approx(3.0, rel=0.1)
    assert fitted.margin_slope < 0.05


def test_overconfidence_growing_with_the_margin_is_undone():
    rng = np.random.default_rng(0)
    head_logits = rng.normal(size=(6000, 5)) * rng.uniform(0.5, 6.0, size=(6000, 1))
    truth = Calibration(temperature=1.0, margin_slope=0.3)
    true_logits = head_logits / truth._temperatures(head_logits, np)
    labels = honest_labels(true_logits)

    fitted = Calibration.fit(head_logits, labels)
    assert fitted.temperature == pytest.approx(1.0, abs=0.25)
    assert fitted.margin_slope == pytest.approx(0.3, rel=0.2)
    best_plain_temperature = min(
        Calibration(t).negative_log_likelihood(head_logits, labels)
        for t in np.geomspace(0.2, 20.0, 200)
    )
    assert fitted.negative_log_likelihood(head_logits, labels) < best_plain_temperature - 0.01


def test_calibration_keeps_every_row_s_order_and_sums_to_one():
    logits = np.random.default_rng(2).normal(scale=4.0, size=(50, 6)).astype(np.float32)
    probabilities = ops.convert_to_numpy(Calibration(0.7, 0.2).probabilities(logits))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (np.argsort(probabilities, axis=1) == np.argsort(logits, axis=1)).all()


def test_bundles_from_before_the_margin_term_scale_by_temperature_alone():
    assert Calibration.of({"temperature": 0.8}) == Calibration(0.8, 0.0)
    fitted = Calibration(0.8, 0.05)
    assert Calibration.of({"file": "head.keras", **fitted.as_dict()}) == fitted
