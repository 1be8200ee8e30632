"""The unbiased recipes' backward operands in one Triton pass each: a randomized Hadamard rotation along
the rows (or none), then NVFP4 quantization (round to nearest, stochastic rounding, or MS-EDEN), written
as BF16 values times E4M3 block scales (exact in BF16) with the FP32 tensor scale apart, for a BF16
tensor-core GEMM, or as the codes and E4M3 scale bytes the native block-scaled FP4 GEMM reads
(``packed``; kernels/blackwell.py).

The tensor scale needs the amax of the *rotated* tensor, so a launch in AMAX mode rotates and reduces
first (the rotation is recomputed in the second launch rather than stored: a [G, G] product per group is
cheaper than a round trip through memory). The rotation runs on the tensor cores as three TF32 products
("tf32x3", about FP32's precision): as an FP32 FMA loop, a 128-group spilled ~20 KB of registers per
thread, and the spills dominated quartet2's backward (CHANGELOG.md). Stochastic decisions use uniforms
drawn by torch (same count, shape and generator as the reference draws), so the kernel takes the
reference's exact decisions for a seed. Numerics against the reference (``reference``): bit-exact
whenever the rotation is exact in FP32 (e.g. integer inputs with groups 16 or 64, whose Hadamard entries
are powers of two) or absent; otherwise the FP32 rotation's summation order differs from torch's, and a
value that lands within an ulp of a rounding boundary may round the other way
(tests/test_rotate_quantize.py bounds how often). A NaN or inf poisons as in the reference: its blocks
(after the rotation, its whole group row) or, where the tensor scale becomes NaN, the whole tensor.
"""

import torch

from fp4compile.runtime import eden
from fp4compile.runtime.hadamard import hadamard_matrix, rht
from fp4compile.runtime.kernels.blackwell_quantize import PackedOperand, from_quantized
from fp4compile.runtime.quantize import nvfp4_operand, nvfp4_tensor_scale, quantize

try:
    import triton
    import triton.language as tl

    from fp4compile.runtime.kernels.triton_quantize import (e2m1_code, e2m1_rne, e4m3_neighbours, e4m3_rne,
                                                             pack_codes)

    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False

ROUNDINGS = ("nearest", "stochastic", "eden")
_AMAX = 3  # kernel MODE: 0, 1, 2 are the ROUNDINGS


def reference(x: torch.Tensor, signs: torch.Tensor | None, rounding: str, generator=None, x_scale=None,
              packed: bool = False):
    """x [..., C] (times the FP32 scalar ``x_scale``, if given) rotated along C by ``signs`` (None: not
    rotated) and quantized to NVFP4 by ``rounding``, as (values x block scales in BF16, tensor scale), or
    ``packed``: as the native kernel's codes and scales (a PackedOperand): the definition the kernel is
    tested against."""
    x = x.float() if x_scale is None else x.float() * x_scale
    rotated = x if signs is None else rht(x, signs)
    if rounding == "eden":
        q = eden.ms_eden_quantized(rotated, signs.numel(), generator)
    else:
        q = quantize(rotated, "nvfp4", rounding=rounding, generator=generator)
    return from_quantized(q) if packed else nvfp4_operand(q)


if HAS_TRITON:

    @triton.jit
    def _e2m1_sr(v, u):
        """E2M1 stochastic rounding with uniform u: up with probability (|v| - lower) / step."""
        mag = tl.minimum(tl.abs(v), 6.0)
        step = tl.where(mag < 2.0, 0.5, tl.where(mag < 4.0, 1.0, 2.0))
        lower = tl.floor(mag / step) * step
        q = tl.where(u < (mag - lower) / step, lower + step, lower)
        sign = v.to(tl.int32, bitcast=True) & -2147483648  # v's sign, on a zero too (as torch's copysign)
        return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _rotate_quantize_kernel(
        x_ptr, xs_ptr, sh_ptr, u_ptr, ts_ptr, out_ptr, scale_ptr, amax_ptr,
        R, stride_x, stride_u, stride_o, stride_s,
        SCALED: tl.constexpr,  # multiply x by the FP32 scalar at xs_ptr first (the saved operands' scales)
        G: tl.constexpr,  # the rotation group: one program covers BLOCK_R rows x one group of G columns
        BLOCK_R: tl.constexpr,
        ROTATE: tl.constexpr,
        MODE: tl.constexpr,  # 0 nearest, 1 stochastic, 2 MS-EDEN, 3 amax of the rotated tensor only
        PACKED: tl.constexpr,  # write codes [R, C/2] to out_ptr and scale bytes [R, C/16] to scale_ptr
        INV_VAL_MAX: tl.constexpr,  # fl32(1 / the scaled amax a block maps to): 1/6, or MS-EDEN's
    ):
        pid_r = tl.program_id(0)
        pid_g = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_g * G + tl.arange(0, G)
        mask = rows[:, None] < R
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SCALED:
            x = x * tl.load(xs_ptr)
        if ROTATE:
            j = tl.arange(0, G)
            sh = tl.load(sh_ptr + j[:, None] * G + j[None, :])  # diag(signs) @ H
            y = tl.dot(x, sh, input_precision="tf32x3")
        else:
            y = x
        if MODE == 3:
            # tl.max drops NaNs on a GPU (max.f32); the reference's amax keeps them.
            amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
            has_nan = tl.max(tl.max((y != y).to(tl.int32), axis=1), axis=0) != 0
            tl.store(amax_ptr + pid_r * tl.num_programs(1) + pid_g, tl.where(has_nan, float("nan"), amax))
        else:
            ts = tl.load(ts_ptr)
            yb = tl.reshape(y, (BLOCK_R, G // 16, 16))
            amax = tl.max(tl.abs(yb), axis=2)
            # As the reference: a block holding a NaN or inf, or a NaN tensor scale, dequantizes to NaN.
            non_finite = (yb != yb).to(tl.int32) + (tl.abs(yb) == float("inf")).to(tl.int32)
            poisoned = tl.max(non_finite, axis=2) + (ts != ts).to(tl.int32) > 0
            safe_ts = tl.where(ts == 0.0, 1.0, ts)
            bs = tl.math.div_rn(amax * INV_VAL_MAX, safe_ts)
            bs, _ = e4m3_rne(tl.minimum(bs, 448.0))
            if MODE == 2:
                bs = tl.where(bs == 0.0, 1.0, bs)  # an all-zero block: any scale, its values are 0
            scale = bs * ts
            scale = tl.where(scale == 0.0, float("inf"), scale)  # zero blocks round to 0, not NaN
            v = tl.math.div_rn(yb, scale[:, :, None])
            blocks = pid_g * (G // 16) + tl.arange(0, G // 16)
            u_offs = rows[:, None] * stride_u + blocks[None, :]
            if MODE == 1:
                u = tl.load(u_ptr + u_offs[:, :, None] * 16 + tl.arange(0, 16)[None, None, :],
                            mask=mask[:, :, None], other=0.0)
                q = _e2m1_sr(v, u)
            else:
                q = e2m1_rne(v)
                if MODE == 2:
                    # EDEN: per row's group, scale by <v, v> / <v, q>, rounded stochastically onto E4M3.
                    num = tl.sum(tl.sum(v * v, axis=2), axis=1)
                    den = tl.sum(tl.sum(v * q, axis=2), axis=1)
                    corr = tl.where(den == 0.0, 1.0, tl.math.div_rn(num, tl.where(den == 0.0, 1.0, den)))
                    corrected = tl.minimum(bs * corr[:, None], 448.0)
                    down, up = e4m3_neighbours(corrected)
                    p_up = tl.math.div_rn(corrected - down, up - down)
                    u = tl.load(u_ptr + u_offs, mask=mask, other=0.0)
                    bs = tl.where(u < p_up, up, down)
            if PACKED:
                # Codes two per byte and E4M3 scale bytes (NaN, 0x7F, for a poisoned block).
                codes = pack_codes(e2m1_code(tl.reshape(q, (BLOCK_R, G))), BLOCK_R, G)
                half = pid_g * (G // 2) + tl.arange(0, G // 2)
                tl.store(out_ptr + rows[:, None] * stride_o + half[None, :], codes, mask=mask)
                _, byte = e4m3_rne(bs)
                byte = tl.where(poisoned, 0x7F, byte).to(tl.uint8)
                tl.store(scale_ptr + rows[:, None] * stride_s + blocks[None, :], byte, mask=mask)
            else:
                out = tl.where(poisoned[:, :, None], float("nan"), q * bs[:, :, None])
                out = tl.reshape(out, (BLOCK_R, G))
                tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out.to(tl.bfloat16), mask=mask)


def rotate_quantize(x: torch.Tensor, signs: torch.Tensor | None, rounding: str, generator=None, x_scale=None,
                    packed: bool = False, kernel=None, BLOCK_R: int = 64):
    """:func:`reference` of a 2-D x [R, C] (C a multiple of len(signs), or of 16 unrotated) in two
    launches of the kernel; ``x_scale`` (0-d FP32) is multiplied in as x is read, so a scaled copy of x is
    never written; ``packed`` as in :func:`reference`. ``kernel`` overrides the launched function (an
    interpreted copy in CPU tests)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    rows, cols = x.shape
    if signs is None:
        if rounding == "eden":
            raise ValueError("MS-EDEN's correction is per rotation group: pass the rotation's signs")
        if cols % 16:
            raise ValueError(f"the quantized dim has size {cols}, not a multiple of the NVFP4 block 16")
        group = 64 if cols % 64 == 0 else 16  # columns per program: any multiple of the block
    else:
        group = signs.numel()
        if cols % group:
            raise ValueError(f"the rotated dim has size {cols}, not a multiple of the Hadamard group {group}")
    kernel = kernel or _rotate_quantize_kernel
    x = x if x.stride(-1) == 1 else x.contiguous()
    sh = None if signs is None else (signs.float().to(x.device)[:, None] * hadamard_matrix(group, x.device))
    grid = (triton.cdiv(rows, BLOCK_R), cols // group)
    inv_val_max = eden.SCALE_OVERRIDE / 6.0 if rounding == "eden" else 1.0 / 6.0
    partial = torch.zeros(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    # 8 warps hold a 64 x 128 rotation with few spills (cuobjdump -res-usage of an sm_90 AOT build).
    xs = None if x_scale is None else x_scale.float().reshape(())
    common = dict(SCALED=xs is not None, G=group, BLOCK_R=BLOCK_R, ROTATE=signs is not None,
                  INV_VAL_MAX=inv_val_max, PACKED=packed, num_warps=8 if group * BLOCK_R >= 8192 else 4)
    kernel[grid](x, xs, sh, None, None, None, None, partial, rows, x.stride(0), 0, 0, 0, MODE=_AMAX, **common)
    amax = partial.amax() if partial.numel() else partial.new_zeros(())
    tensor_scale = eden.tensor_scale(amax) if rounding == "eden" else nvfp4_tensor_scale(amax)
    uniforms = None
    if rounding == "stochastic":
        uniforms = torch.rand((rows, cols), generator=generator, device=x.device)
    elif rounding == "eden":
        uniforms = torch.rand((rows, cols // eden.BLOCK), generator=generator, device=x.device)
    stride_u = 0 if uniforms is None else uniforms.stride(0) // (16 if rounding == "stochastic" else 1)
    if packed:
        out = torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device)
        scales = torch.empty((rows, cols // 16), dtype=torch.uint8, device=x.device)
    else:
        out, scales = torch.empty((rows, cols), dtype=torch.bfloat16, device=x.device), None
    kernel[grid](x, xs, sh, uniforms, tensor_scale, out, scales, partial, rows, x.stride(0), stride_u, out.stride(0),
                 0 if scales is None else scales.stride(0), MODE=ROUNDINGS.index(rounding), **common)
    if packed:
        return PackedOperand(out, scales.view(torch.float8_e4m3fn), tensor_scale, "nvfp4")
    return out, tensor_scale
