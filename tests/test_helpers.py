"""The comparison helper itself must be able to fail."""
import pytest
import torch

from helpers import assert_close


def test_assert_close_accepts_within_tolerance():
    x = torch.randn(100, dtype=torch.float64)
    assert_close((x + 1e-6).float(), x)


def test_assert_close_rejects_out_of_tolerance_and_reports_errors():
    x = torch.randn(100, dtype=torch.float64)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close((x + 1e-2).float(), x)


def test_assert_close_rejects_nan_where_expected_finite():
    x = torch.zeros(4, dtype=torch.float64)
    y = x.clone().float()
    y[2] = float("nan")
    with pytest.raises(AssertionError, match="NaN/inf mismatch"):
        assert_close(y, x)


def test_assert_close_rejects_shape_mismatch():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(4, dtype=torch.float64))
