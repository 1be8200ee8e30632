"""The differentiable gradient estimator (DGE): a smooth stand-in for FP4 rounding and its derivative.

Both take weights in the scaled domain (w / scale, within [-6, 6]). On the grid interval [a, a + d] that
holds |w| (d = 0.5 below 2, 1 below 4, 2 up to 6), with u = (|w| - a) / d:
    f(w)  = sign(w) * (a + d * (1 + sign(2u - 1) * |2u - 1| ** (1 / k)) / 2)
    f'(w) = min((1 / k) * |2u - 1| ** (1 / k - 1), clip)

f' runs over every weight element in each backward, so it is written for a GPU's arithmetic: its power is
exp2(e * log2|t|), within ~5e-7 (relative) of ``pow``, a long accurate routine where exp2 and log2 are
hardware approximations; and u is |w| / d - floor(|w| / d), exact since d is a power of two (both
faster than exp(e * ln|t|) and the interval's ends, CHANGELOG.md). The exponent stays a Python
number: ``xlogy(e, t)`` made it a scalar tensor, created on the device in every backward call.
"""

import torch

from fp4compile.runtime.e2m1 import E2M1_MAX, grid_step, inverse_grid_step


def _interval(w_scaled: torch.Tensor):
    """(a, d, u) of |w|: |w| / d is exact, so u is exact. |w| = 6 gets a = 6, u = 0 rather than the last
    interval's a = 4, u = 1: f and f' only see |2u - 1| = 1 there, and f = a + d * (1 - 1) / 2 = 6."""
    mag = w_scaled.float().abs().clamp(max=E2M1_MAX)
    d = grid_step(mag)
    y = mag * inverse_grid_step(mag)
    n = torch.floor(y)
    return n * d, d, y - n


def dge_smooth(w_scaled: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """The smooth quantizer f(w) that DGE differentiates."""
    a, d, u = _interval(w_scaled)
    t = 2 * u - 1
    return torch.copysign(a + d * (1 + torch.sign(t) * t.abs() ** (1 / k)) / 2, w_scaled.float())


def dge_derivative(w_scaled: torch.Tensor, k: float = 5.0, clip: float = 3.0) -> torch.Tensor:
    """f'(w), clipped to at most ``clip`` (it is infinite at the middle of each interval)."""
    _, _, u = _interval(w_scaled)
    t, e = (2 * u - 1).abs(), 1 / k - 1
    # At k = 1, t^0 = 1 also at t = 0, where e * log2 t is NaN; a NaN stays NaN (as xlogy(0, NaN) is).
    power = torch.exp2(e * torch.log2(t)) if e else torch.where(t.isnan(), t, 1.0)
    return (power / k).clamp(max=clip)
