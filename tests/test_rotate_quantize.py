"""The fused rotate + NVFP4 quantize Triton kernel against its reference (kernels/rotate_quantize.py):
on CPU in Triton's interpreter (in a subprocess: the interpreter must be chosen before triton is
imported), and on a CUDA device.

Bit-exact where the rotation is exact in FP32 (integer inputs, groups 16 and 64: Hadamard entries 1/4 and
1/8) or absent (nvidia's unrotated dA operand, any input), with an operand scale multiplied in as x is
read, and with a NaN or inf planted (NaN exactly where the reference has NaN). On rotated general inputs
the rotation's FP32 sums run in another order than torch's, and a value within an ulp of a rounding
boundary may round the other way, so there the test bounds the fraction of differing values. Run as ``TRITON_INTERPRET=1 python tests/test_rotate_quantize.py``, this file prints the
interpreter results as JSON.
"""

import json

import pytest
import torch
from conftest import run_interpreted

triton = pytest.importorskip("triton")

from fp4compile.runtime.hadamard import random_signs  # noqa: E402
from fp4compile.runtime.kernels import rotate_quantize as rq  # noqa: E402

# (rounding, group: None = not rotated, integer input, a scale x is multiplied by as it is read, a NaN
# or an inf planted in x); exact cases must match bit for bit (NaN where the reference has NaN). A
# power-of-two scale keeps integer inputs' rotation exact.
EXACT_CASES = ([(r, g, True, None, None) for r in rq.ROUNDINGS for g in (16, 64)]
               + [("eden", 64, True, 0.125, None)]
               + [(r, None, False, s, None) for r in rq.ROUNDINGS[:2] for s in (None, 0.37)]
               + [(r, 16, True, None, bad) for r in rq.ROUNDINGS for bad in ("nan", "inf")]
               + [("stochastic", None, False, None, "nan")])
GENERAL_CASES = [(r, 128, False, None, None) for r in rq.ROUNDINGS] + [("eden", 128, False, 0.37, None)]
MAX_DIFFERING = 1e-3  # fraction of values; observed: 0 to a few 1e-5


def _input(exact: bool, device: str, rows: int = 200, cols: int = 256) -> torch.Tensor:
    """Rows at different magnitudes (block scales down to E4M3's subnormals), one all-zero block, and a
    ragged row count (not a multiple of the kernel's BLOCK_R)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, cols, generator=gen) * 4
    if exact:
        x = x.round()
    x = x * torch.exp2(torch.randint(-12, 3, (rows, 1), generator=gen).float())
    x[3, :16] = 0
    return x.to(device)


def _compare(rounding: str, group: int | None, integer: bool, scale: float | None, bad: str | None,
             device: str) -> dict:
    x = _input(integer, device)
    if bad:
        x[5, 40] = float(bad)
    signs = None if group is None else random_signs(group, generator=torch.Generator().manual_seed(group)).to(device)
    x_scale = None if scale is None else torch.tensor(scale, device=device)
    ref_v, ref_s = rq.reference(x, signs, rounding, torch.Generator(device).manual_seed(5), x_scale)
    got_v, got_s = rq.rotate_quantize(x, signs, rounding, torch.Generator(device).manual_seed(5), x_scale)
    dtype, ref_v, got_v = str(got_v.dtype), ref_v.float(), got_v.float()
    differing = (ref_v != got_v) & ~(ref_v.isnan() & got_v.isnan())
    same_scale = torch.allclose(ref_s.float(), got_s.float(), rtol=0, atol=0, equal_nan=True)
    return dict(dtype=dtype, same_scale=same_scale, differing=float(differing.float().mean()),
                nan=float(got_v.isnan().float().mean()))


def _all_cases(device: str) -> dict:
    cases = {f"{r} g{g} x{s} {bad or 'finite'} exact": case for case in EXACT_CASES for r, g, _, s, bad in [case]}
    cases.update({f"{r} g{g} x{s} general": case for case in GENERAL_CASES for r, g, _, s, _ in [case]})
    return {name: _compare(*case, device) for name, case in cases.items()}


def _check(results: dict) -> None:
    assert len(results) == len(EXACT_CASES) + len(GENERAL_CASES)
    for name, r in results.items():
        assert r["dtype"] == "torch.bfloat16", name
        if name.endswith("exact"):
            assert r["same_scale"] and r["differing"] == 0, (name, r)
        else:
            assert r["differing"] <= MAX_DIFFERING, (name, r)
        assert (r["nan"] > 0) == (" nan " in name or " inf " in name), (name, r)  # poisoned, and only then


def test_interpreter_matches_reference():
    _check(run_interpreted(__file__))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_reference():
    results = _all_cases("cuda")
    print(json.dumps(results))
    _check(results)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounding must be one of"):
        rq.rotate_quantize(torch.zeros(4, 16), torch.ones(16), "up")
    with pytest.raises(ValueError, match="not a multiple of the Hadamard group 32"):
        rq.rotate_quantize(torch.zeros(4, 48), torch.ones(32), "nearest")
    with pytest.raises(ValueError, match="pass the rotation's signs"):
        rq.rotate_quantize(torch.zeros(4, 16), None, "eden")
    with pytest.raises(ValueError, match="not a multiple of the NVFP4 block 16"):
        rq.rotate_quantize(torch.zeros(4, 24), None, "nearest")


if __name__ == "__main__":
    print(json.dumps(_all_cases("cpu")))
