"""Outlier clamping and compensation (OCC) for activations: the reference.

The thresholds are the alpha and 1 - alpha quantiles of the whole tensor, by nearest rank: the upper
one is the ceil(alpha * n)-th smallest value, the lower one its mirror from the top, so about
(1 - alpha) * n entries lie beyond each. The residual X - clamp(X) is non-zero only at those entries;
the matmul multiplies it with the other operand in high precision.

An exact selection over a 16k x 4k activation costs more than the GEMM it serves (half a second on an
H100), so with ``sample=m`` the quantiles come from a fixed stratified sample: entry i of the sample is
taken from the i-th of m consecutive chunks of n // m flat entries, at offset ((i mod 65521) * 7919 mod
65521) mod (n // m) within it (the prime modulus decorrelates the offset from the chunk's place in its row), so the
sample spreads over rows and columns alike, is the same every step and needs no random state. The last
n mod m entries are left out, so sampling starts at n >= 16 m (a tail below 1/16 of the tensor). Every
product stays below max(n, 2^29): Inductor folds this arithmetic into a gather's index, which it computes
in int32 on CUDA when n < 2^31 (a multiplicative hash mod n overflowed there).
The fraction of entries beyond an estimated threshold then has a standard deviation of
sqrt(p (1 - p) / m) around p = 1 - alpha: for m = 65536 and alpha = 0.99, 1% +- 0.04%.

Non-finite entries (NaN, +-inf) are counted out of the ranks, so they poison only their own rows (their
scale is NaN; an inf's residual is inf or NaN, which R @ W^T carries to its row only) and never the
thresholds every row is clamped to. Of the n entries selected from (the tensor, or its sample), c not
finite: with k = ceil(alpha * n) as above, the upper threshold is the (k - c)-th smallest finite entry
and the lower one the (k - c)-th largest, so n - k finite entries still lie beyond each, as without them.
If the two cross (k - c < 1, or lower > upper: more than 2k - n - 1 entries not finite), nothing is
clamped (thresholds -inf, +inf). Without non-finite entries this is the plain nearest rank, bit for bit.
The selection maps non-finite entries to -inf (for the upper) and +inf (for the lower) before the same
kthvalue calls: no host sync, no data-dependent shape, no count.
"""

from fractions import Fraction

import torch


_MIN_CHUNK = 16
_MIX, _MIX_MOD = 7919, 65521  # i -> i * 7919 mod 65521 (a prime): scrambles i's low bits


def sample_index(n: int, m: int, device=None) -> torch.Tensor:
    """The flat indices of the stratified sample of m among n > m entries (see the module doc)."""
    i = torch.arange(m, device=device, dtype=torch.int64)
    chunk = n // m
    return i * chunk + i % _MIX_MOD * _MIX % _MIX_MOD % chunk


def occ_thresholds(x: torch.Tensor, quantile: float, sample: int | None = None):
    """(lower, upper) clamp thresholds of ``x`` as 0-d tensors in ``x``'s dtype: exact, or estimated from
    a stratified sample of ``sample`` entries when ``x`` has at least 16 times that many. Non-finite
    entries are counted out (see the module doc)."""
    if not 0.5 < quantile <= 1.0:
        raise ValueError(f"occ_quantile must be in (0.5, 1], got {quantile}")
    flat = x.reshape(-1)
    n = flat.numel()
    if sample is not None and n >= _MIN_CHUNK * sample:
        flat, n = flat[sample_index(n, sample, x.device)], sample
    # ceil(quantile * n) in integer arithmetic, so a symbolic n stays symbolic (no guard, no recompile);
    # 0.5 < quantile <= 1 keeps k within [1, n].
    q = Fraction(quantile).limit_denominator(1 << 20)
    k = (n * q.numerator + q.denominator - 1) // q.denominator
    finite = torch.isfinite(flat)
    upper = torch.kthvalue(torch.where(finite, flat, -torch.inf), k).values
    lower = torch.kthvalue(torch.where(finite, flat, torch.inf), n - k + 1).values
    crossed = lower > upper  # never without non-finite entries: k >= n - k + 1
    return torch.where(crossed, -torch.inf, lower), torch.where(crossed, torch.inf, upper)


def occ_clamp(x: torch.Tensor, quantile: float, sample: int | None = None):
    """(clamp(x) in x's dtype, residual x - clamp(x) in float32)."""
    if x.numel() == 0:
        return x, x.float()
    lower, upper = occ_thresholds(x, quantile, sample)
    clamped = torch.clamp(x, lower, upper)
    return clamped, x.float() - clamped.float()
