"""Blackwell native FP4: the Triton block-scaled GEMM lowers to sm_100's FP4 MMAs, checked by
ahead-of-time compilation on any machine; its numerics against the reference fake-quantized product on
CPU (Triton's interpreter, in a subprocess) and on a CUDA device.

Run as ``TRITON_INTERPRET=1 python tests/test_blackwell_aot.py interpret``, this file prints the interpreter
results as JSON: that is what the CPU numerics tests do, in a subprocess (the interpreter must be chosen
before triton is imported).
"""

import functools
import json
import sys

import pytest
import torch
from conftest import bits_equal, run_interpreted
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from triton.runtime import interpreter  # noqa: E402

from fp4compile import aot  # noqa: E402
from fp4compile.cli import main  # noqa: E402
from fp4compile.runtime import e2m1, gemm  # noqa: E402
from fp4compile.runtime.hadamard import random_signs  # noqa: E402
from fp4compile.runtime.kernels import blackwell as bw  # noqa: E402
from fp4compile.runtime.kernels import blackwell_quantize as bq  # noqa: E402
from fp4compile.runtime.kernels import rotate_quantize as rq  # noqa: E402
from fp4compile.runtime.quantize import fake_quantize, gemm_operand, tiles_operand, tiles_quantized  # noqa: E402

U32 = 2.0**-24  # FP32 unit roundoff


def fp32_tolerance(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Elementwise bound of FP32 accumulation: (K + 4) * u * (|Xq| @ |Wq|^T), plus the few roundings of the
    scale multiplies (the epilogue's tensor scales, the reference's value * scale), and a tiny floor."""
    k = xq.shape[-1]
    return (k + 4) * U32 * (xq.double().abs() @ wq.double().abs().T) + 1e-30


def same_values(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal as numbers, NaN where NaN: the same bits up to the sign of a zero (the kernel's accumulator
    starts at +0, so a dot product whose every term is -0 comes out +0 where the emulation may give -0)."""
    return bool(((got == want) | (got.isnan() & want.isnan())).all())


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_100 (runs on CPU)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "format, kind, block",
    [("mxfp4", "kind::mxf4.block_scale", 32), ("nvfp4", "kind::mxf4nvf4.block_scale", 16),
     ("vector", "kind::mxf4.block_scale", 32)],  # vector: unit E8M0 scales made in the kernel, same FP4 MMA
)
def test_aot_sm100_lowers_to_native_fp4_mma(format, kind, block):
    result = aot.compile_for("sm_100", format)
    assert result.target == "sm_100" and result.format == format
    assert result.native, result.mma_instructions
    assert result.mma_instructions and all(op.startswith("tcgen05.mma") for op in result.mma_instructions)
    assert any(kind in op for op in result.mma_instructions), result.mma_instructions
    assert all(aot.mma_block_size(op) == block for op in result.mma_instructions)
    assert result.mma_lines and all(kind in line for line in result.mma_lines)
    assert result.cubin_size > 0
    assert kind in result.ptx and ".target sm_100" in result.ptx


@pytest.mark.parametrize("format", ["mxfp4", "nvfp4"])
def test_aot_sm100_quantize_kernel_compiles(format):
    result = aot.compile_for("sm_100", format, "quantize")
    assert result.kernel == "quantize" and result.cubin_size > 0 and not result.mma_instructions
    if format == "nvfp4":
        assert "div.rn.f32" in result.ptx  # IEEE divisions, as the reference quantizer's


def test_wrong_format_string_errors():
    with pytest.raises(ValueError, match="unknown FP4 format 'mxfp8'"):
        aot.compile_for("sm_100", "mxfp8")
    with pytest.raises(ValueError, match="the gemm kernel takes the formats"):
        aot.compile_for("sm_100", "tensor")
    with pytest.raises(ValueError, match="the quantize kernel takes the formats"):
        aot.compile_for("sm_100", "vector", "quantize")
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="unknown FP4 format 'nvfp8'"):
        bq.pack_operand(x, "nvfp8")
    with pytest.raises(ValueError, match="block-scaled formats only"):
        bw.block_scaled_matmul(x, x, "tensor")
    with pytest.raises(ValueError, match="target must look like 'sm_100'"):
        aot.compile_for("hopper", "mxfp4")


@pytest.mark.parametrize("format, block", [("mxfp4", 32), ("nvfp4", 16)])
def test_k_not_divisible_by_block_errors(format, block):
    k = block * 3 + block // 2
    x, w = torch.randn(4, k), torch.randn(8, k)
    with pytest.raises(ValueError, match=f"not a multiple of {block}"):
        bw.block_scaled_matmul(x, w, format)
    with pytest.raises(ValueError, match=f"not a multiple of {block}"):
        bq.pack_operand(x, format)
    # Packed operands whose K breaks the block size reach the op itself: the same clear error.
    qa = bq.pack_operand(torch.randn(4, 2 * block), format)
    cut = qa.packed[:, : k // 2 - block]  # K = 2 * (k // 2 - block), not a multiple of block
    with pytest.raises(ValueError, match=f"not a multiple of {block}"):
        bw.block_scaled_mm(cut, qa.scales, cut, qa.scales, qa.tensor_scale, qa.tensor_scale, format)
    with pytest.raises(ValueError, match="BLOCK_K must be a multiple of 64"):
        aot.compile_for("sm_100", format, BLOCK_K=96)


def test_doctor_target_sm100_exit_code(capsys):
    assert main(["doctor", "--target", "sm_100"]) == 0
    out = capsys.readouterr().out
    assert "kind::mxf4.block_scale" in out and "kind::mxf4nvf4.block_scale" in out
    assert "gemm vector     native FP4 MMA: tcgen05.mma" in out and "quantize vector" not in out
    assert "cubin" in out and "torch" in out and "triton" in out
    for name in ("tensor", "vector", "mxfp4", "nvfp4"):
        assert f"  {name}" in out


@pytest.mark.parametrize("target", ["sm_1000", "sm_abc", "sm_7", "sm_75"])
def test_doctor_bad_target_exits_2_with_one_line(target, capsys):
    assert main(["doctor", "--target", target]) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and target in errors[0]


def test_doctor_compiler_abort_exits_2_with_one_line(monkeypatch, capsys):
    """LLVM aborts the compiling process on some inputs: the doctor compiles in a child and reports it."""
    import subprocess

    aot.compilable_targets()  # cached before run() is replaced
    stderr = "'sm_1000a' is not a recognized processor\nLLVM ERROR: Cannot select: intrinsic %llvm.nvvm.x\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -6, "", stderr))
    assert main(["doctor", "--target", "sm_100"]) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot compile for sm_100: triton's compiler stopped (signal 6): "
                      "LLVM ERROR: Cannot select: intrinsic %llvm.nvvm.x"]


# ---------------------------------------------------------------------------------------------------------
# Numerics, CPU: the kernel under Triton's interpreter, against the reference fake-quantized product
# ---------------------------------------------------------------------------------------------------------

# (M, N, K, BLOCK_M, BLOCK_N, BLOCK_K): ragged M and N, K not a multiple of BLOCK_K, one tile, many tiles.
INTERPRET_CASES = [(37, 45, 192, 16, 16, 128), (1, 70, 64, 16, 32, 64), (50, 9, 96, 32, 16, 64),
                   (64, 64, 256, 32, 32, 128), (23, 31, 320, 16, 16, 256)]


def _install_dot_scaled_semantics():
    """Give Triton's interpreter a ``dot_scaled`` that decodes both scale types: Triton 3.8 and 3.9
    decode every scale byte as E8M0, which is wrong for NVFP4's E4M3 scales. Semantics (OCP MX v1.0,
    NVFP4): value = E2M1 code (low nibble first along K) * block scale; products accumulated in FP32,
    then added to ``acc``."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def e2m1(codes, axis):
        codes = np.moveaxis(codes, axis, -1)
        nib = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
        mag = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)[nib & 7]
        return np.moveaxis(np.where(nib & 8, -mag, mag).astype(np.float32), -1, axis)

    def scales(handle):
        raw = handle.data.view(np.uint8)
        if handle.dtype == tl.float8e4nv:
            return torch.from_numpy(raw.copy()).view(torch.float8_e4m3fn).float().numpy()
        assert handle.dtype in (tl.uint8, tl.int8), handle.dtype  # E8M0: 2^(byte - 127), 255 = NaN
        return np.where(raw == 255, np.nan, np.exp2(raw.astype(np.float32) - 127)).astype(np.float32)

    def create_dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, fast_math,
                          lhs_k_pack, rhs_k_pack, acc):
        assert lhs_k_pack and rhs_k_pack
        a = e2m1(lhs.data, -1)  # [M, K]
        b = e2m1(rhs.data, -2)  # [K, N]
        a = a * np.repeat(scales(lhs_scale), a.shape[-1] // lhs_scale.data.shape[-1], axis=-1)
        b = b * np.repeat(scales(rhs_scale), b.shape[-2] // rhs_scale.data.shape[-1], axis=-1).T
        return interpreter.TensorHandle(np.matmul(a, b) + acc.data, tl.float32)

    interpreter.InterpreterBuilder.create_dot_scaled = create_dot_scaled


def _quantize_inputs():
    """Inputs for the quantize kernel: wide dynamic ranges (E4M3 block scales down to subnormal and zero),
    exact ties on the E2M1 grid's midpoints, zeros and -0, tiny and huge values, bfloat16."""
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        r, k = int(torch.randint(1, 40, (1,), generator=gen)), 32 * int(torch.randint(1, 9, (1,), generator=gen))
        exps = torch.randint(-40, 40, (r, k // 16), generator=gen).float()
        yield f"random{i}", torch.randn(r, k, generator=gen) * torch.exp2(exps).repeat_interleave(16, 1)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)
    yield "ties", torch.stack([ties * 2.0**e for e in range(-10, 10)])
    zeros = torch.randn(4, 64, generator=gen)
    zeros[:, :32], zeros[1] = 0.0, -0.0
    yield "zeros", zeros
    yield "tiny", torch.randn(8, 64, generator=gen) * 1e-40
    yield "huge", torch.randn(4, 64, generator=gen) * 1e37
    small = torch.randn(16, 128, generator=gen)
    small[:, 64:] *= 1e-9
    yield "subnormal_scales", small
    yield "bfloat16", (torch.randn(16, 128, generator=gen) * 100).bfloat16()


def _quantize_cases() -> dict:
    """{case: True if the Triton quantizer's bytes equal the reference's}; non-finite inputs: scales only."""
    same = {}
    for name, x in _quantize_inputs():
        for format in ("mxfp4", "nvfp4"):
            ref, got = bq.pack_operand(x, format), bq.quantize_triton(x, format, BLOCK_R=16, BLOCK_K=64)
            same[f"{format} {name}"] = (
                torch.equal(ref.packed, got.packed)
                and torch.equal(ref.scales.view(torch.uint8), got.scales.view(torch.uint8))
                and (ref.tensor_scale is None or torch.equal(ref.tensor_scale, got.tensor_scale))
            )
    x = torch.randn(4, 64)
    x[1, 3], x[2, 40] = float("nan"), float("inf")
    for format in ("mxfp4", "nvfp4"):
        ref, got = bq.pack_operand(x, format), bq.quantize_triton(x, format)
        same[f"{format} nan_inf"] = torch.equal(ref.scales.view(torch.uint8), got.scales.view(torch.uint8)) and (
            ref.tensor_scale is None or (ref.tensor_scale.isnan() and got.tensor_scale.isnan()).item())
    return same


# Vector format: (M, N, K, BLOCK_M, BLOCK_N, BLOCK_K): K not a multiple of 32 (70), odd (45: one zero code
# appended), 2, and K tails of BLOCK_K; ragged M and N. FP32 output only: Triton's interpreter truncates
# FP32 -> BF16 casts (a GPU rounds them to nearest even); the GPU test checks BF16 output.
VECTOR_CASES = [(37, 45, 192, 16, 16, 128), (3, 70, 70, 16, 32, 64), (50, 9, 45, 32, 16, 64),
                (23, 31, 320, 16, 16, 256), (5, 6, 2, 16, 16, 64)]


def _vector_operands(m, n, k, gen, device="cpu"):
    """gemm_operand(., "vector") of random rows spanning 2^+-20, with an all-zero row (scale 0) and a NaN row
    (NaN scale) in each operand: the NaN row of B must poison a column, the zero row of A stays 0 elsewhere."""
    x = torch.randn(m, k, generator=gen, device=device) * torch.exp2(
        torch.randint(-20, 20, (m, 1), generator=gen, device=device).float())
    w = torch.randn(n, k, generator=gen, device=device)
    x[0], w[0] = 0.0, 0.0
    x[-1, k // 2], w[-1, 0] = float("nan"), float("nan")
    return (*gemm_operand(x, "vector"), *gemm_operand(w, "vector"))


def _vector_interpret_cases() -> dict:
    """{case: the kernel's output equals gemm.emulated's (same_values)} for the vector format (interpreted)."""
    same, gen = {}, torch.Generator().manual_seed(7)
    for m, n, k, bm, bn, bk in VECTOR_CASES:
        xv, xs, wv, ws = _vector_operands(m, n, k, gen)
        (pa, sa), (pb, sb) = bq.split_vector(xv, xs), bq.split_vector(wv, ws)
        out = torch.full((m, n), float("nan"))
        bw.launch(pa, sa, pb, sb, None, None, "vector", out, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2)
        want = gemm.emulated(xv, xs, wv, ws)
        same[f"vector {m}x{n}x{k}"] = want[-1].isnan().all().item() and same_values(out, want)
    return same


def _interpret_cases() -> dict:
    """Run the kernel (interpreted; TRITON_INTERPRET=1 must be set before triton is imported) on every case:
    MXFP4 with Triton's own interpreted dot_scaled, then both formats with ours. Returns
    {semantics: {case: worst error / FP32 tolerance}}."""
    results = {"quantize": _quantize_cases()}
    for semantics in ("triton", "fp4compile"):
        if semantics == "fp4compile":
            _install_dot_scaled_semantics()
        gen = torch.Generator().manual_seed(6)
        ratios = results[semantics] = {}
        results[f"vector {semantics}"] = _vector_interpret_cases()
        for format in ("mxfp4", "nvfp4") if semantics == "fp4compile" else ("mxfp4",):
            for m, n, k, bm, bn, bk in INTERPRET_CASES:
                x = torch.randn(m, k, generator=gen) * torch.exp2(torch.randint(-6, 6, (m, 1), generator=gen))
                w = torch.randn(n, k, generator=gen)
                x[0, : bq.BLOCK_FORMATS[format].block_size] = 0  # an all-zero block
                qa, qb = bq.pack_operand(x, format), bq.pack_operand(w, format)
                out = torch.full((m, n), float("nan"))
                bw.launch(qa.packed, qa.scales, qb.packed, qb.scales, qa.tensor_scale, qb.tensor_scale, format,
                          out, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2)
                xq, wq = fake_quantize(x, format), fake_quantize(w, format)
                err = (out.double() - (xq.double() @ wq.double().T)).abs()
                ratios[f"{format} {m}x{n}x{k}"] = (err / fp32_tolerance(xq, wq)).max().item()
    return results


@functools.lru_cache(maxsize=None)
def _interpreted() -> dict:
    """This file's interpreter results, computed once per session (one subprocess runs every case)."""
    return run_interpreted(__file__, "interpret", TRITON_DEFAULT_FP_FUSION="1")


# Triton < 3.8's interpreter has no dot_scaled, and 3.6's cannot run this kernel's K loop under numpy 2
# (pyproject's test extra asks for triton >= 3.8, so CI runs these).
needs_interpreted_dot_scaled = pytest.mark.skipif(
    not hasattr(interpreter.InterpreterBuilder, "create_dot_scaled"),
    reason=f"triton {triton.__version__}'s interpreter cannot run dot_scaled (needs >= 3.8)",
)


@needs_interpreted_dot_scaled
def test_interpreter_numerics_match_reference():
    """Both formats, ragged M/N and K tails: the kernel's indexing, masking, K loop and epilogue, with
    dot_scaled given the formats' defined semantics (see _install_dot_scaled_semantics)."""
    results = _interpreted()["fp4compile"]
    assert len(results) == 2 * len(INTERPRET_CASES)
    bad = {case: ratio for case, ratio in results.items() if not ratio <= 1.0}
    assert not bad, f"error above the FP32-accumulation tolerance: {bad}"


@needs_interpreted_dot_scaled
def test_interpreter_quantize_kernel_bit_exact():
    """The Triton quantize kernel's packed codes and scales are the reference quantizer's, byte for byte."""
    results = _interpreted()["quantize"]
    assert len(results) == 2 * (len(list(_quantize_inputs())) + 1)
    assert all(results.values()), [case for case, same in results.items() if not same]


@needs_interpreted_dot_scaled
def test_interpreter_numerics_triton_semantics_mxfp4():
    """MXFP4 through Triton's own interpreted dot_scaled (E8M0 decode is Triton's, not ours)."""
    results = _interpreted()["triton"]
    assert len(results) == len(INTERPRET_CASES)
    bad = {case: ratio for case, ratio in results.items() if not ratio <= 1.0}
    assert not bad, f"error above the FP32-accumulation tolerance: {bad}"


@needs_interpreted_dot_scaled
@pytest.mark.parametrize("semantics", ["triton", "fp4compile"])
def test_interpreter_vector_bit_exact_with_emulation(semantics):
    """The vector format on the kernel (unit block scales, row scales in the epilogue) gives gemm.emulated's
    bits (up to the sign of zero, see same_values): every partial sum of E2M1 products is a multiple of 1/4
    below 2^22 for K up to 2^22 / 36, so exact in FP32 and independent of the accumulation order, and the
    epilogue rounds the two scale multiplies in the emulation's order. NaN rows and columns, zero rows,
    K tails and odd K included."""
    results = _interpreted()[f"vector {semantics}"]
    assert len(results) == len(VECTOR_CASES)
    assert all(results.values()), [case for case, same in results.items() if not same]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.integers(1, 9), k=st.integers(1, 80), shift=st.integers(-130, 120))
def test_split_vector_round_trip(seed, m, k, shift):
    """split_vector's codes times its row scales decode to exactly the operand's values times scales (a NaN
    row to NaN), for any K (odd: one zero code appended), over the FP32 range; the CPU op equals the
    emulation (same_values: the appended +0 code can turn a -0 sum into +0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 2.0**shift
    x[0] = 0.0
    if m > 2:
        x[2, k - 1] = torch.nan
    values, scale = gemm_operand(x, "vector")
    packed, s = bq.split_vector(values, scale)
    assert packed.dtype == torch.uint8 and packed.shape == (m, (k + 1) // 2) and s.shape == (m,)
    decoded = e2m1.decode_e2m1(e2m1.unpack_e2m1(packed))
    assert (decoded[:, k:] == 0).all()
    assert bits_equal(decoded[:, :k] * s[:, None], values.float() * scale, False)
    assert m <= 2 or s[2].isnan()
    out = bw.vector_scaled_mm(packed, s, packed, s)
    assert same_values(out, gemm.emulated(values, scale, values, scale))


def test_cpu_vector_op_and_compile():
    """vector_gemm takes scaled_gemm's operands ([..., M, K] x [N, K], row or 0-d scales); the op's
    checks; the op under torch.compile; opcheck."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 96, generator=gen), torch.randn(24, 96, generator=gen)
    (xv, xs), (wv, ws) = gemm_operand(x, "vector"), gemm_operand(w, "vector")
    out = bw.vector_gemm(xv, xs, wv, ws, torch.bfloat16)
    assert out.shape == (2, 5, 24) and same_values(out, gemm.emulated(xv, xs, wv, ws).bfloat16())
    (tv, ts) = gemm_operand(x, "tensor")
    assert same_values(bw.vector_gemm(tv, ts, wv, ws), gemm.emulated(tv, ts, wv, ws))
    (pa, sa), (pb, sb) = bq.split_vector(xv[0], xs[0]), bq.split_vector(wv, ws)
    with pytest.raises(ValueError, match=r"a_row_scale must be FP32 \[5\]"):
        bw.vector_scaled_mm(pa, xs[0], pb, sb)
    with pytest.raises(TypeError, match="split_vector makes them"):
        bw.vector_scaled_mm(xv[0], sa, pb, sb)
    with pytest.raises(ValueError, match="packed bytes per row"):
        bw.vector_scaled_mm(pa[:, 1:], sa, pb, sb)
    args = (pa, sa, pb, sb)
    compiled = torch.compile(lambda *a: torch.ops.fp4compile.vector_scaled_mm(*a), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(*args), torch.ops.fp4compile.vector_scaled_mm(*args), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fp4compile.vector_scaled_mm.default, args)


def test_cpu_op_and_compile_match_reference():
    """The registered op on CPU (FP32 decode) and under torch.compile."""
    gen = torch.Generator().manual_seed(0)
    for format in ("mxfp4", "nvfp4"):
        x, w = torch.randn(2, 5, 128, generator=gen), torch.randn(24, 128, generator=gen)
        xq, wq = fake_quantize(x, format), fake_quantize(w, format)
        out = bw.block_scaled_matmul(x, w, format)
        assert out.shape == (2, 5, 24)
        assert ((out - xq @ wq.T).abs() <= fp32_tolerance(xq.reshape(-1, 128), wq).reshape(2, 5, 24)).all()
    qa, qb = bq.pack_operand(x[0], "mxfp4"), bq.pack_operand(w, "mxfp4")
    args = (qa.packed, qa.scales, qb.packed, qb.scales, None, None, "mxfp4")
    # aot_eager: traces the triton_op through AOTAutograd as Inductor would, without a C++ build on CPU.
    compiled = torch.compile(lambda *a: torch.ops.fp4compile.block_scaled_mm(*a), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(*args), torch.ops.fp4compile.block_scaled_mm(*args), rtol=0, atol=0)
    # Schema, fake tensor and AOT dispatch checks of the custom op (MXFP4: CPU allclose has no float8 kernels).
    torch.library.opcheck(torch.ops.fp4compile.block_scaled_mm.default, args)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.integers(-24, 12), special=st.booleans(),
       quantizer=st.sampled_from(["nearest", "stochastic", "eden", "tiles", "transposed tiles"]))
def test_packed_nvfp4_operands_decode_to_their_values(seed, shift, special, quantizer):
    """On the native kernel the unbiased recipes' operands are quantized into codes and E4M3 scales (the
    reference's ``packed`` form; for nvidia's dX, a tiled weight's transposed by ``transposed_tiles``):
    they must decode to exactly the BF16 values x block scales the other paths multiply, with the same
    tensor scale, over magnitudes down to E4M3's subnormal scales, with zero blocks, -0 and non-finite
    inputs (NaN where the values are NaN)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=gen) * 2.0**shift * torch.rand(32, 1, generator=gen)
    x[1, :16], x[4, 3] = 0, -0.0
    if special:
        x[2, 20], x[3, 40] = torch.nan, torch.inf
    if quantizer.endswith("tiles"):
        packed = bq.from_quantized(tiles_quantized(x))
        values, ts = tiles_operand(x)
        if quantizer == "transposed tiles":
            packed, (values, ts) = bq.transposed_tiles(packed), tiles_operand(x.T.contiguous())
    else:
        signs = random_signs(64, generator=gen) if quantizer == "eden" else None
        packed = rq.reference(x, signs, quantizer, torch.Generator().manual_seed(seed), packed=True)
        values, ts = rq.reference(x, signs, quantizer, torch.Generator().manual_seed(seed))
    assert packed.packed.dtype == torch.uint8 and packed.scales.dtype == torch.float8_e4m3fn
    decoded, decoded_ts = bq.gemm_values(packed)
    assert decoded.dtype == values.dtype == torch.bfloat16 and decoded.shape == values.shape
    assert bits_equal(decoded.float(), values.float(), False) and bits_equal(decoded_ts, ts, False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.integers(-140, 120), format=st.sampled_from(["mxfp4", "nvfp4"]),
       special=st.booleans())
def test_gemm_values_of_a_packed_operand_are_gemm_operand(seed, shift, format, special):
    """On the native path a block-format operand is quantized once, into the kernel's codes and scales, and
    the backward's (values, outer) are decoded from them: the same bits as gemm_operand, over magnitudes
    from E8M0's and E4M3's smallest scales to their largest, zero blocks and rows (MXFP4 rows whose blocks
    span more than E4M3 folds exactly), and blocks holding NaN or inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 96, generator=gen) * 2.0**shift * torch.rand(12, 1, generator=gen)
    x[1, :32] *= 2.0**-20
    x[2, :48], x[3] = 0, 0
    if special:
        x[4, 5], x[5, 70], x[6, 7] = torch.nan, torch.inf, -0.0
    values, outer = bq.gemm_values(bq.pack_operand(x, format))
    want_values, want_outer = gemm_operand(x, format)
    assert values.dtype == want_values.dtype and values.shape == want_values.shape
    assert bits_equal(values.float(), want_values.float(), False)
    assert outer.shape == want_outer.shape and bits_equal(outer, want_outer, False)


# ---------------------------------------------------------------------------------------------------------
# Numerics on a CUDA device: native tcgen05 on sm_100, Triton's emulated dot_scaled on sm_90
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("format", ["mxfp4", "nvfp4"])
def test_gpu_kernel_matches_reference(format):
    device = torch.device("cuda")
    reason = bw.kernel_reason(device, format)
    if reason:
        pytest.skip(reason)
    gen = torch.Generator(device).manual_seed(6)
    for m, n, k in [(128, 128, 256), (1, 300, 512), (333, 77, 1024), (1000, 257, 96), (4096, 4096, 4096)]:
        x = torch.randn(m, k, device=device, generator=gen)
        w = torch.randn(n, k, device=device, generator=gen)
        qa, qb = bq.pack_operand(x, format), bq.pack_operand(w, format)
        out = bw.block_scaled_mm(qa.packed, qa.scales, qb.packed, qb.scales, qa.tensor_scale, qb.tensor_scale,
                                 format)
        xq, wq = fake_quantize(x, format), fake_quantize(w, format)
        err = (out.double() - xq.double() @ wq.double().T).abs()
        assert (err <= fp32_tolerance(xq, wq)).all(), (m, n, k, err.max().item())
        compiled = torch.compile(lambda *a: torch.ops.fp4compile.block_scaled_mm(*a), fullgraph=True)
        again = compiled(qa.packed, qa.scales, qb.packed, qb.scales, qa.tensor_scale, qb.tensor_scale, format)
        torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_vector_kernel_bit_exact_with_emulation():
    """The vector format on the device kernel (native kind::mxf4 on sm_100, emulated dot_scaled on sm_90)
    gives gemm.emulated's values (exact partial sums, see the interpreter test), FP32 and BF16 output, eager
    and compiled."""
    device = torch.device("cuda")
    if bw.kernel_reason(device, "vector"):  # a GPU the kernel is not built for (not sm_90 or sm_10x)
        pytest.skip(f"this GPU has no vector kernel: {bw.kernel_reason(device, 'vector')}")
    gen = torch.Generator(device).manual_seed(6)
    for m, n, k in [(128, 128, 256), (1, 300, 512), (333, 77, 70), (1000, 257, 45), (4096, 4096, 4096)]:
        xv, xs, wv, ws = _vector_operands(m, n, k, gen, device)
        for dtype in (torch.float32, torch.bfloat16):
            out = bw.vector_gemm(xv, xs, wv, ws, dtype)
            want = gemm.emulated(xv, xs, wv, ws).to(dtype)
            assert same_values(out, want), (m, n, k, dtype)
        (pa, sa), (pb, sb) = bq.split_vector(xv, xs), bq.split_vector(wv, ws)
        compiled = torch.compile(lambda *a: torch.ops.fp4compile.vector_scaled_mm(*a), fullgraph=True)
        assert bits_equal(compiled(pa, sa, pb, sb), bw.vector_scaled_mm(pa, sa, pb, sb), False)  # same kernel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quantize_kernel_bit_exact():
    if bw.kernel_reason(torch.device("cuda"), "mxfp4"):
        pytest.skip(bw.kernel_reason(torch.device("cuda"), "mxfp4"))
    for name, x in _quantize_inputs():
        for format in ("mxfp4", "nvfp4"):
            ref, got = bq.pack_operand(x.cuda(), format), bq.quantize_triton(x.cuda(), format)
            assert torch.equal(ref.packed, got.packed), (name, format)
            assert torch.equal(ref.scales.view(torch.uint8), got.scales.view(torch.uint8)), (name, format)
            assert ref.tensor_scale is None or torch.equal(ref.tensor_scale, got.tensor_scale), (name, format)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "interpret":
    print(json.dumps(_interpret_cases()))
