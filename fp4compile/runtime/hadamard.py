"""Randomized Hadamard transforms (RHT) along one dim, in groups of 16, 32, 64 or 128 (method.md,
"Unbiased NVFP4 training"): x -> x · diag(s) · H per group, H the orthonormal Sylvester-Hadamard matrix and
s random signs. The transform is orthonormal, so its inverse is its transpose; fresh signs each step
spread a block's outliers over the group without a fixed pattern.

The forward rotation of ``FP4Config.rotation`` (``rotate``) uses fixed signs and the
unnormalized matrix D·H' (entries +-1, D = diag(s), H' = sqrt(n)·H): its entries are exact in any float
dtype, so it runs as a GEMM in the operands' own dtype (BF16 tensor cores under autocast), and
(x D H')(w D H')^T = n · x w^T, a power of two that the matmul takes out exactly.

The transform is a [group, group] matmul on the grouped dim: torch has no fast Walsh-Hadamard transform,
and at these sizes the matmul is cheap and exact to FP32 rounding.
"""

import torch

GROUP_SIZES = (16, 32, 64, 128)


def hadamard_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal n x n Sylvester-Hadamard matrix (symmetric: H = H^T = H^-1): entry (i, j) is
    (-1)^popcount(i & j) / sqrt(n). Built from torch ops each call (no cached tensor, which would leak
    from one torch.compile trace into another)."""
    return (_sylvester(n, device) / n**0.5).to(dtype)


def _sylvester(n: int, device=None) -> torch.Tensor:
    """sqrt(n) times ``hadamard_matrix(n)``: entries (-1)^popcount(i & j), in float64."""
    check_group(n)
    i = torch.arange(n, device=device)
    both = i[:, None] & i[None, :]
    parity = sum((both >> bit) & 1 for bit in range(n.bit_length() - 1)) % 2
    return (1 - 2 * parity).to(torch.float64)


def check_group(group: int) -> None:
    if group not in GROUP_SIZES:
        raise ValueError(f"Hadamard group size must be one of {GROUP_SIZES}, got {group}")


def group_for(size, at_most: int) -> int | None:
    """The largest Hadamard group of at most ``at_most`` that divides ``size`` (None if none does): the
    group a rotation of at most ``at_most`` takes along a dim of ``size``, or an error message suggests."""
    fits = [g for g in GROUP_SIZES if g <= at_most and bool(size % g == 0)]
    return fits[-1] if fits else None


def random_signs(group: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A vector of ``group`` random +-1 signs (one rotation), drawn from ``generator`` (torch's default
    generator if None, so torch.manual_seed makes a run repeat)."""
    check_group(group)
    bits = torch.randint(0, 2, (group,), generator=generator, device=device)
    return (bits * 2 - 1).float()


def fixed_signs(group: int, device=None) -> torch.Tensor:
    """The fixed +-1 signs of ``rotate``: the low bit of a 32-bit integer hash of each index (two rounds of
    xor-shift-multiply), the same in every process, so a recomputed forward (activation checkpointing)
    and every rank rotate alike. Computed by torch ops rather than held as a constant tensor: equal
    expressions let AOTAutograd's CSE merge the rotations of an input that several GEMMs share."""
    h = torch.arange(group, device=device) + 0x9E37
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return 1.0 - 2.0 * ((h ^ (h >> 16)) & 1).to(torch.float64)


def rotation_matrix(group: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """D·H' of ``rotate``: the unnormalized Sylvester-Hadamard matrix (entries +-1) with its rows times
    ``fixed_signs``. Its rows are orthogonal with squared norm ``group``."""
    return (fixed_signs(group, device)[:, None] * _sylvester(group, device)).to(dtype)


def rotate(x: torch.Tensor, group: int, inverse: bool = False) -> torch.Tensor:
    """x [..., K] times D·H' (``inverse``: times (D·H')^T, the gradient's way back) in groups of ``group``
    along K (K a multiple of it), in x's dtype: a GEMM with FP32 accumulation, rounded once to x's dtype.
    rotate(rotate(x), inverse=True) == group * x up to that rounding."""
    m = rotation_matrix(group, x.device, x.dtype)
    return (_grouped(x, -1, group) @ (m.mT if inverse else m)).flatten(-2)


def _grouped(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    check_group(group)
    x = x.movedim(dim, -1)
    if x.shape[-1] % group:
        raise ValueError(
            f"dim {dim} has size {x.shape[-1]}, not a multiple of the Hadamard group {group}; "
            f"pad it or choose a group size that divides it (one of {GROUP_SIZES})"
        )
    return x.unflatten(-1, (-1, group))


def rht(x: torch.Tensor, signs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x rotated along ``dim`` in groups of len(signs): each group g -> (g * signs) @ H. Computed in FP32."""
    group = signs.numel()
    g = _grouped(x.float(), dim, group)
    y = (g * signs.to(g.device)) @ hadamard_matrix(group, g.device)
    return y.flatten(-2).movedim(-1, dim)


def inverse_rht(y: torch.Tensor, signs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The inverse of :func:`rht` with the same signs: g -> (g @ H) * signs (H symmetric, orthonormal)."""
    group = signs.numel()
    g = _grouped(y.float(), dim, group)
    x = (g @ hadamard_matrix(group, g.device)) * signs.to(g.device)
    return x.flatten(-2).movedim(-1, dim)
