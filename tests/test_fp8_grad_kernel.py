"""The Triton kernel pair that quantizes dY for both gradient GEMMs (kernels/fp8_grad_triton.py) against
its reference, two ``quantize_fp8_rows`` calls: bit-exact on a CUDA device; on CPU in Triton's
interpreter (in a subprocess: the interpreter must be chosen before triton is imported), where scales are
bit-exact and the data are compared after the interpreter's own FP32 -> FP8 cast of the reference's
FP32 values (the interpreter's cast does not round to nearest, and casts NaN to arbitrary values, so
there data are compared where the reference's are not NaN; the device's cast is compared as is).

Cases: ragged shapes (not multiples of the tiles), per-row and 0-d folds, a NaN, an inf, an
all-zero row and column, and a row tiny enough for the 2^-126 scale floor (normal in BF16: the
interpreter converts BF16 subnormals wrongly). Run as
``TRITON_INTERPRET=1 python tests/test_fp8_grad_kernel.py``, this file prints the interpreter results.
"""

import json
import os
import re

import pytest
import torch
from conftest import bits_equal, run_interpreted

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fp4compile.runtime.fp8 import quantize_fp8_rows  # noqa: E402
from fp4compile.runtime.kernels.fp8_grad_triton import fp8_grad_operands  # noqa: E402
from fp4compile.runtime.quantize import reciprocal  # noqa: E402

SHAPES = [(100, 70), (64, 128), (1, 130), (130, 1)]
DTYPES = [torch.float8_e5m2, torch.float8_e4m3fn]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _inputs(m: int, n: int, scalar_folds: bool, device: str):
    g = torch.Generator().manual_seed(m * 1000 + n)
    dy = torch.randn(m, n, generator=g) * torch.exp2(torch.randint(-20, 20, (m, 1), generator=g).float())
    if m > 4 and n > 4:
        dy[1, 2], dy[3, 0] = float("nan"), float("-inf")
        dy[2], dy[:, 4] = 0.0, 0.0
        dy[4] = 1e-37
    folds = [torch.rand((), generator=g) + 0.5 for _ in range(2)] if scalar_folds else [
        torch.rand(n, generator=g) + 0.5, torch.rand(m, generator=g) + 0.5]
    return dy.bfloat16().to(device), *(f.to(device) for f in folds)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)


def _triton_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x.contiguous(), y, x.numel(), BLOCK=1024)
    return y


def _reference(dy, fold_cols, fold_rows, dtype):
    """(dX data, scale, dW data, scale) of the reference on CPU; in the interpreter the data are the
    reference's FP32 values cast as the interpreter casts, NaN kept."""
    dy, fold_cols, fold_rows = dy.cpu(), fold_cols.cpu(), fold_rows.cpu()
    out = []
    for x in (dy.float() * fold_cols, dy.mT.float() * fold_rows):
        data, scale = quantize_fp8_rows(x, dtype)
        if INTERPRETED:
            values = x * reciprocal(scale)
            data = torch.where(values.isnan(), values, _triton_cast(values, dtype).float()).to(dtype)
        out += [data.contiguous(), scale]
    return out


def _all_cases(device: str) -> dict:
    results = {}
    for m, n in SHAPES:
        for scalar in (False, True):
            for dtype in DTYPES:
                dy, fold_cols, fold_rows = _inputs(m, n, scalar, device)
                got = fp8_grad_operands(dy, fold_cols.expand(n).contiguous(), fold_rows.expand(m).contiguous(), dtype)
                want = _reference(dy, fold_cols, fold_rows, dtype)
                results[f"{m}x{n} {'0-d' if scalar else 'vector'} folds {dtype}"] = [
                    [tuple(g.shape) == tuple(w.shape), bits_equal(g.cpu(), w, INTERPRETED)]
                    for g, w in zip(got, want)]
    return results


def _check(results: dict) -> None:
    assert len(results) == len(SHAPES) * 2 * len(DTYPES)
    for name, outputs in results.items():
        assert outputs == [[True, True]] * 4, (name, outputs)  # shape and bits of dX, its scale, dW, its scale


def test_interpreter_matches_reference():
    _check(run_interpreted(__file__))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_reference():
    _check(_all_cases("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_custom_op_schema_and_fake_match_the_kernel():
    dy, fold_cols, fold_rows = _inputs(100, 70, False, "cuda")
    torch.library.opcheck(fp8_grad_operands, (dy, fold_cols, fold_rows, torch.float8_e5m2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("cc", [90, 100])
def test_compiles_ahead_of_time_for_hopper_and_blackwell(cc):
    """On any machine: the three kernels build for sm_90 and sm_100 at the operator's tiles, with no
    float64 arithmetic; the amax kernel reduces with relaxed atomic maxima, the scale kernel divides by
    IEEE division, the quantize kernel converts with the hardware's E5M2 instruction."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fp4compile.runtime.kernels import fp8_grad_triton as grad

    tile = {"x_ptr": "*bf16", "fc_ptr": "*fp32", "fr_ptr": "*fp32"}
    sizes = {"M": "i32", "N": "i32"}
    kernels = (
        (grad._amax_kernel, {**tile, "amax_ptr": "*i32", **sizes}, grad.AMAX_TILE,
         r"(atom|red)\.global\.gpu\.relaxed\.max\.s32"),  # triton 3.6 atom, 3.9 red
        (grad._scale_kernel, {"amax_ptr": "*i32", "recip_ptr": "*fp32", "dx_scale_ptr": "*fp32",
                              "dw_scale_ptr": "*fp32", **sizes}, None, r"div\.rn\.f32"),
        (grad._quantize_kernel, {**tile, "recip_ptr": "*fp32", "dx_ptr": "*fp8e5", "dw_ptr": "*fp8e5", **sizes},
         grad.QUANTIZE_TILE, r"cvt\.rn\.satfinite\.e5m2x2\.f32"),
    )
    for kernel, signature, tile_shape, instruction in kernels:
        if tile_shape is None:
            constexprs, warps = {"INV_MAX": 1.0 / 57344.0, "MIN_SCALE": grad.MIN_SCALE, "BLOCK": grad._SCALE_BLOCK}, 4
        else:
            block_m, block_n, warps = tile_shape
            constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        compiled = triton.compile(
            ASTSource(kernel, {**signature, **{name: "constexpr" for name in constexprs}}, constexprs=constexprs),
            target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        ptx = compiled.asm["ptx"]
        assert len(compiled.asm["cubin"]) > 0 and ".f64" not in ptx and re.search(instruction, ptx), kernel


if __name__ == "__main__":
    print(json.dumps(_all_cases("cpu")))
