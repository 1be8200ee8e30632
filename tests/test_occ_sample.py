"""OCC's sampled quantile estimate: the fraction clamped stays within the error runtime/occ.py states."""

import math

import pytest
import torch

from fp4compile.runtime.occ import occ_clamp, occ_thresholds, sample_index


def test_sampled_thresholds_clamp_about_one_percent_each_side():
    m, alpha = 65536, 0.99
    sigma = math.sqrt(alpha * (1 - alpha) / m)
    x = torch.randn(2048, 512)
    x[:, 7] *= 20  # an outlier channel: the hashed sample must not miss whole columns
    lower, upper = occ_thresholds(x, alpha, sample=m)
    above = (x > upper).float().mean().item()
    below = (x < lower).float().mean().item()
    assert abs(above - (1 - alpha)) < 6 * sigma and abs(below - (1 - alpha)) < 6 * sigma, (above, below)


def test_sample_at_least_numel_is_exact():
    x = torch.randn(300, 100)
    assert occ_thresholds(x, 0.99, sample=30000) == occ_thresholds(x, 0.99)
    clamped, residual = occ_clamp(x, 0.99, sample=1000)
    assert torch.equal(clamped.float() + residual, x)


@pytest.mark.parametrize("rows, cols", [(4096, 512), (32768, 768), (1000, 4097)])
def test_sample_reaches_every_row_and_column(rows, cols):
    """Every column, and every row before the unsampled tail of n mod m entries."""
    n, m = rows * cols, 65536
    index = sample_index(n, m)
    assert index.unique().numel() == m and int(index.max()) < n - n % m
    assert index.div(cols, rounding_mode="floor").unique().numel() == (n - n % m - 1) // cols + 1
    assert (index % cols).unique().numel() == cols
