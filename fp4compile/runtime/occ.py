"""Outlier clamping and compensation (OCC) for activations: the reference.

The thresholds are the exact alpha and 1 - alpha quantiles of the whole tensor, by nearest rank: the
upper one is the ceil(alpha * n)-th smallest value, the lower one its mirror from the top, so about
(1 - alpha) * n entries lie beyond each. The residual X - clamp(X) is non-zero only at those entries;
the matmul multiplies it with the other operand in high precision.
"""

from fractions import Fraction

import torch


def occ_thresholds(x: torch.Tensor, quantile: float):
    """(lower, upper) clamp thresholds of ``x`` as 0-d tensors in ``x``'s dtype."""
    if not 0.5 < quantile <= 1.0:
        raise ValueError(f"occ_quantile must be in (0.5, 1], got {quantile}")
    flat = x.reshape(-1)
    n = flat.numel()
    # ceil(quantile * n) in integer arithmetic, so a symbolic n stays symbolic (no guard, no recompile);
    # 0.5 < quantile <= 1 keeps k within [1, n].
    q = Fraction(quantile).limit_denominator(1 << 20)
    k = (n * q.numerator + q.denominator - 1) // q.denominator
    upper = torch.kthvalue(flat, k).values
    lower = torch.kthvalue(flat, n - k + 1).values
    return lower, upper


def occ_clamp(x: torch.Tensor, quantile: float):
    """(clamp(x) in x's dtype, residual x - clamp(x) in float32)."""
    if x.numel() == 0:
        return x, x.float()
    lower, upper = occ_thresholds(x, quantile)
    clamped = torch.clamp(x, lower, upper)
    return clamped, x.float() - clamped.float()
