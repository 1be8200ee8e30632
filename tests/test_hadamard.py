"""Randomized Hadamard transforms: orthonormal, exact inverse, products preserved, seeded signs, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4compile.runtime.hadamard import (GROUP_SIZES, fixed_signs, hadamard_matrix, inverse_rht, random_signs, rht,
                                         rotate, rotation_matrix)


@pytest.mark.parametrize("n", GROUP_SIZES)
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-14)
    assert bool((h.abs() == 1 / n**0.5).all())  # every entry +-1/sqrt(n): a rotation spreads mass evenly


@settings(max_examples=30, deadline=None)
@given(group=st.sampled_from(GROUP_SIZES), rows=st.integers(1, 5), groups=st.integers(1, 3),
       dim=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1))
def test_round_trip_and_dot_products(group, rows, groups, dim, seed):
    """inverse_rht(rht(x)) == x and <Rx, Ry> == <x, y> up to FP32 rounding (about log2(group) ulps)."""
    gen = torch.Generator().manual_seed(seed)
    shape = [rows, group * groups] if dim == 1 else [group * groups, rows]
    x, y = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    signs = random_signs(group, gen)
    rx = rht(x, signs, dim)
    torch.testing.assert_close(inverse_rht(rx, signs, dim), x, rtol=0, atol=1e-5)
    dots = (rx * rht(y, signs, dim)).sum(dim), (x * y).sum(dim)
    torch.testing.assert_close(*dots, rtol=1e-5, atol=1e-4)


def test_signs_are_seeded_and_fresh():
    torch.manual_seed(0)
    first, second = random_signs(64), random_signs(64)
    torch.manual_seed(0)
    assert torch.equal(random_signs(64), first) and not torch.equal(first, second)
    assert set(first.tolist()) == {-1.0, 1.0}


def test_rotation_spreads_an_outlier():
    """One outlier in a group of 128 becomes 128 entries of equal magnitude: the point of rotating."""
    x = torch.zeros(1, 128)
    x[0, 5] = 100.0
    y = rht(x, random_signs(128))
    torch.testing.assert_close(y.abs(), torch.full_like(y, 100 / 128**0.5))


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="one of"):
        random_signs(48)
    with pytest.raises(ValueError, match="not a multiple of the Hadamard group 32"):
        rht(torch.randn(4, 48), random_signs(32))


@pytest.mark.parametrize("n", GROUP_SIZES)
def test_forward_rotation_matrix_is_exact_and_fixed(n):
    """config.rotation's D·H': entries exactly +-1 (so any float dtype holds it), rows orthogonal with
    squared norm n, and signs that are the same every call and not all alike."""
    m = rotation_matrix(n, dtype=torch.float64)
    assert set(m.flatten().tolist()) == {-1.0, 1.0}
    assert torch.equal(m @ m.T, n * torch.eye(n, dtype=torch.float64))
    assert torch.equal(fixed_signs(n), fixed_signs(n)) and 0 < (fixed_signs(n) > 0).sum() < n


@settings(max_examples=30, deadline=None)
@given(group=st.sampled_from(GROUP_SIZES), rows=st.integers(1, 5), groups=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_rotate_and_its_inverse(group, rows, groups, dtype, seed):
    """On small integers every sum is exact (in BF16 too: |sum| <= 128 with entries in -1..1): rotate keeps
    x's dtype, its inverse brings back group * x, and <rotate(x), rotate(y)> == group * <x, y>."""
    gen = torch.Generator().manual_seed(seed)
    top = 1 if dtype == torch.bfloat16 else 3
    x, y = (torch.randint(-top, top + 1, (rows, group * groups), generator=gen).to(dtype) for _ in range(2))
    rx = rotate(x, group)
    assert rx.dtype == dtype
    assert torch.equal(rotate(rx, group, inverse=True), group * x)
    assert torch.equal((rx.double() * rotate(y, group).double()).sum(-1), group * (x.double() * y.double()).sum(-1))
