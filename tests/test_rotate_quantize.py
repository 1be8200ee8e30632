"""The fused rotate + NVFP4 quantize Triton kernel against its reference (kernels/rotate_quantize.py): on
CPU in Triton's interpreter (in a subprocess: the interpreter must be chosen before triton is imported),
and on a CUDA device.

Bit-exact where the rotation is exact in FP32 (integer inputs, groups 16 and 64: Hadamard entries 1/4 and
1/8) or absent (nvidia's unrotated dA operand, any input), with an operand scale multiplied in as x is
read, and with a NaN or inf planted (NaN exactly where the reference has NaN); in both outputs, BF16
values times block scales and the packed codes and scale bytes of the native FP4 GEMM (which must decode
to the same values). On rotated general inputs the rotation's FP32 sums run in another order than
torch's, and a value within an ulp of a rounding boundary may round the other way, so there the test
bounds the fraction of differing values. Run as ``TRITON_INTERPRET=1 python
tests/test_rotate_quantize.py``, this file prints the interpreter results as JSON.
"""

import json
import re

import pytest
import torch
from conftest import run_interpreted

triton = pytest.importorskip("triton")

from fp4compile.runtime import e2m1  # noqa: E402
from fp4compile.runtime.hadamard import random_signs  # noqa: E402
from fp4compile.runtime.kernels import blackwell_quantize as bq  # noqa: E402
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
    # The packed form (the native kernel's codes and scale bytes), same draws: it must decode to the
    # values the kernel writes, and hold the reference's bytes in every block not poisoned.
    ref_p = rq.reference(x, signs, rounding, torch.Generator(device).manual_seed(5), x_scale, packed=True)
    got_p = rq.rotate_quantize(x, signs, rounding, torch.Generator(device).manual_seed(5), x_scale, packed=True)
    decoded = bq.gemm_values(got_p)[0].float()
    live = ref_p.scales.float().isfinite() & got_p.scales.float().isfinite()
    codes = (e2m1.unpack_e2m1(ref_p.packed) != e2m1.unpack_e2m1(got_p.packed))[live.repeat_interleave(16, -1)]
    scale_bytes = ref_p.scales.view(torch.uint8) != got_p.scales.view(torch.uint8)
    return dict(dtype=dtype, same_scale=same_scale, differing=float(differing.float().mean()),
                nan=float(got_v.isnan().float().mean()),
                packed_decodes_to_values=bool(((decoded == got_v) | (decoded.isnan() & got_v.isnan())).all()),
                packed_tensor_scale=bool(torch.equal(got_p.tensor_scale.nan_to_num(-1), got_s.nan_to_num(-1))),
                differing_codes=float(codes.float().mean()) if codes.numel() else 0.0,
                differing_scale_bytes=float(scale_bytes[live].float().mean()) if live.any() else 0.0)


def _all_cases(device: str) -> dict:
    cases = {f"{r} g{g} x{s} {bad or 'finite'} exact": case for case in EXACT_CASES for r, g, _, s, bad in [case]}
    cases.update({f"{r} g{g} x{s} general": case for case in GENERAL_CASES for r, g, _, s, _ in [case]})
    return {name: _compare(*case, device) for name, case in cases.items()}


def _check(results: dict) -> None:
    assert len(results) == len(EXACT_CASES) + len(GENERAL_CASES)
    for name, r in results.items():
        assert r["dtype"] == "torch.bfloat16", name
        assert r["packed_decodes_to_values"] and r["packed_tensor_scale"], (name, r)
        if name.endswith("exact"):
            assert r["same_scale"], (name, r)
            assert r["differing"] == r["differing_codes"] == r["differing_scale_bytes"] == 0, (name, r)
        else:
            worst = max(r["differing"], r["differing_codes"], r["differing_scale_bytes"])
            assert worst <= MAX_DIFFERING, (name, r)
        assert (r["nan"] > 0) == (" nan " in name or " inf " in name), (name, r)  # poisoned, and only then


def test_interpreter_matches_reference():
    _check(run_interpreted(__file__))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_reference():
    results = _all_cases("cuda")
    print(json.dumps(results))
    _check(results)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rounding, group", [("nearest", None), ("stochastic", None), ("stochastic", 16),
                                             ("nearest", 16), ("eden", 128)])
def test_compiles_ahead_of_time_for_blackwell(packed, rounding, group):
    """On any machine: every launch the unbiased recipes make builds for sm_100 (Hopper runs it in
    test_gpu_matches_reference), in both outputs (BF16 values, or the native FP4 GEMM's codes and scale
    bytes), with IEEE divisions (the reference's) and, with a rotation, its dot on tensor cores (TF32)
    rather than FP32 FMAs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    g = group or 64
    constexprs = {"SCALED": True, "G": g, "BLOCK_R": 64, "ROTATE": group is not None,
                  "MODE": rq.ROUNDINGS.index(rounding), "PACKED": packed, "INV_VAL_MAX": 1.0 / 6.0}
    out = ("*u8", "*u8") if packed else ("*bf16", "*u8")
    pointers = {"x_ptr": "*bf16", "xs_ptr": "*fp32", "sh_ptr": "*fp32", "u_ptr": "*fp32", "ts_ptr": "*fp32",
                "out_ptr": out[0], "scale_ptr": out[1], "amax_ptr": "*fp32"}
    signature = {**pointers, "R": "i32", "stride_x": "i32", "stride_u": "i32", "stride_o": "i32", "stride_s": "i32",
                 **{name: "constexpr" for name in constexprs}}
    kernel = rq._rotate_quantize_kernel
    aligned = {(list(signature).index(name),): [["tt.divisibility", 16]] for name in (*pointers, "stride_x")}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 100, 32), options={"num_warps": 8 if g * 64 >= 8192 else 4})
    ptx = compiled.asm["ptx"]
    assert "div.rn.f32" in ptx and len(compiled.asm["cubin"]) > 0
    assert bool(group) == bool(re.search(r"tcgen05\.mma\S*kind::tf32", ptx))
    assert ("cvt.rn.bf16" in ptx) != packed  # BF16 values, or only bytes


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
