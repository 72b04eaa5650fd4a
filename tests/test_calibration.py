"""Calibration utilities: ECE against a hand computation, temperature scaling recovers a known T."""
import numpy as np
import pytest
import torch

from softrank.calibration import expected_calibration_error, fit_temperature, reliability_curve


def test_ece_hand_computed():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    # 2 bins: [0, .5], (.5, 1]; all confidences (.9, .8, .7, .6) fall in bin 2:
    # mean confidence .75, accuracy 3/4 -> ECE 0
    assert expected_calibration_error(proba, y, n_bins=2) == pytest.approx(0.0)
    # 10 bins: each sample alone; |acc - conf| = .1, .8, .3, .4 -> mean .4
    assert expected_calibration_error(proba, y, n_bins=10) == pytest.approx(0.4)
    c = reliability_curve(proba, y, n_bins=10)
    assert c.counts.sum() == 4 and len(c.confidence) == 4


def test_binary_vector_input_and_errors():
    p1 = np.array([0.9, 0.2, 0.6])
    assert expected_calibration_error(p1, [1, 0, 0], n_bins=10) == pytest.approx(
        expected_calibration_error(np.stack([1 - p1, p1], 1), [1, 0, 0], n_bins=10))
    with pytest.raises(ValueError, match="rows but y has"):
        expected_calibration_error(np.ones((3, 2)) / 2, [0, 1])
    with pytest.raises(ValueError, match="finite"):
        expected_calibration_error(np.full((2, 2), np.nan), [0, 1])


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_temperature_recovers_the_generating_temperature(true_t):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 4, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(logits / true_t, 1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.05)


def test_temperature_scaling_lowers_ece_of_overconfident_logits():
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(5000, 3, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    over = 4 * logits  # over-confident version of a calibrated model
    t = fit_temperature(over, y)
    before = expected_calibration_error(torch.softmax(over, 1).numpy(), y.numpy())
    after = expected_calibration_error(torch.softmax(over / t, 1).numpy(), y.numpy())
    assert t > 2 and after < before / 3
