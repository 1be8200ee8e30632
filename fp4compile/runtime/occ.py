"""Outlier clamping and compensation (OCC) for activations: the reference.

The thresholds are the alpha and 1 - alpha quantiles of the whole tensor, by nearest rank: the upper
one is the ceil(alpha * n)-th smallest value, the lower one its mirror from the top, so about
(1 - alpha) * n entries lie beyond each. The residual X - clamp(X) is non-zero only at those entries;
the matmul multiplies it with the other operand in high precision.

An exact selection over a 16k x 4k activation costs more than the GEMM it serves (half a second on an
H100), so with ``sample=m`` the quantiles come from m entries picked by a fixed multiplicative hash of
their flat index (i * (2^31 - 1) mod n: spread over rows and columns alike, the same every step, no
random state). The fraction of entries beyond an estimated threshold then has a standard deviation of
sqrt(p (1 - p) / m) around p = 1 - alpha: for m = 65536 and alpha = 0.99, 1% +- 0.04%.
"""

from fractions import Fraction

import torch


_HASH = 2147483647  # the prime 2^31 - 1: fits the int32 constants Inductor emits on CUDA


def occ_thresholds(x: torch.Tensor, quantile: float, sample: int | None = None):
    """(lower, upper) clamp thresholds of ``x`` as 0-d tensors in ``x``'s dtype: exact, or estimated from
    ``sample`` hashed entries when ``x`` has more than that many."""
    if not 0.5 < quantile <= 1.0:
        raise ValueError(f"occ_quantile must be in (0.5, 1], got {quantile}")
    flat = x.reshape(-1)
    n = flat.numel()
    if sample is not None and n > sample:
        index = torch.arange(sample, device=x.device, dtype=torch.int64) * _HASH % n
        flat, n = flat[index], sample
    # ceil(quantile * n) in integer arithmetic, so a symbolic n stays symbolic (no guard, no recompile);
    # 0.5 < quantile <= 1 keeps k within [1, n].
    q = Fraction(quantile).limit_denominator(1 << 20)
    k = (n * q.numerator + q.denominator - 1) // q.denominator
    upper = torch.kthvalue(flat, k).values
    lower = torch.kthvalue(flat, n - k + 1).values
    return lower, upper


def occ_clamp(x: torch.Tensor, quantile: float, sample: int | None = None):
    """(clamp(x) in x's dtype, residual x - clamp(x) in float32)."""
    if x.numel() == 0:
        return x, x.float()
    lower, upper = occ_thresholds(x, quantile, sample)
    clamped = torch.clamp(x, lower, upper)
    return clamped, x.float() - clamped.float()
