"""GEMM dispatch: one scaled GEMM primitive for the forward and both backward GEMMs, per device.

    scaled_gemm(a, a_scale, b, b_scale, out_dtype) = (a @ b^T) * a_scale * b_scale^T,   FP32 accumulation

with a [..., M, K], b [..., N, K] and per-row scales ([..., M, 1], [..., N, 1]) or 0-d scales, rounded
once to ``out_dtype``. Operands stored in an FP8 dtype (E2M1 values, folded MXFP4 values, gradients in
float8_e5m2 or e4m3) are exact FP8 numbers, so an FP8 tensor-core GEMM multiplies them exactly. NVFP4
operands (E2M1 values times E4M3 block scales) arrive in BF16, which holds them exactly, as does it every
FP8 value: a BF16 tensor-core GEMM with FP32 output multiplies any mix of them exactly. Float32 operands
take the emulation. Every implementation must agree with ``emulated``.

The paths, by device (``plan`` decides them, for any device without running anything, and the runtime
dispatches on its answer: ``tensor_plan`` asks it about the tensors at hand):

    device          vector / tensor / mxfp4       nvfp4
    sm_10x          the forward of vector, mxfp4, nvfp4: blackwell_fp4 (native FP4 MMA; a 2-D B), else as
                    sm_90; the unbiased recipes' NVFP4 gradient GEMMs too (runtime/unbiased.py)
    sm_89, sm_90,   hopper_fp8                    bf16_exact
    sm_11x, sm_12x
    sm_80, sm_86    bf16_exact                    bf16_exact
    CPU, older GPU  emulated                      emulated

hopper_fp8 needs a 2-D B and K, N multiples of 16 (else bf16_exact); bf16_exact a 2-D B or one batch
dim shared by A and B (else emulated). An empty GEMM (a zero size) is emulated: nothing to multiply.
"""

import torch

from fp4compile.runtime import hopper

# Formats whose forward GEMM has a native FP4 kernel on sm_10x: the block formats, and the vector format as
# unit block scales with its FP32 row scales in the epilogue (kernels/blackwell.py).
NATIVE_FORMATS = ("vector", "mxfp4", "nvfp4")
BF16_MIN_CAPABILITY = (8, 0)  # BF16 tensor cores; torch.mm(..., out_dtype=torch.float32) on CUDA
BF16_EXACT = (torch.bfloat16, *hopper.FP8_DTYPES)  # dtypes whose every value BF16 holds


def row_scale_as_columns(scale: torch.Tensor) -> torch.Tensor:
    """A per-row scale [..., N, 1] turned to broadcast over the columns of an [..., M, N] product."""
    return scale.mT if scale.dim() >= 2 else scale


def emulated(a, a_scale, b, b_scale) -> torch.Tensor:
    """The exact emulation: an FP32 GEMM of the (upcast) operands, scales applied after. Runs anywhere."""
    return torch.matmul(a.float(), b.float().mT) * a_scale * row_scale_as_columns(b_scale)


def bf16_rule(device_type: str, capability, a_dtype, b_dtype, a_shape, b_shape) -> str | None:
    """Why operands a [..., M, K] x b [..., N, K] do not run as an exact BF16 GEMM with FP32 output, or None."""
    if device_type != "cuda" or capability is None or tuple(capability) < BF16_MIN_CAPABILITY:
        return f"device {device_type} {capability or ''} has no BF16 GEMM with FP32 output (CUDA sm_80+)"
    if a_dtype not in BF16_EXACT or b_dtype not in BF16_EXACT:
        return f"{a_dtype} x {b_dtype} operands are not all exact in BF16"
    if not (len(b_shape) == 2 or len(a_shape) == len(b_shape) == 3 and a_shape[0] == b_shape[0]):
        return f"operand shapes {tuple(a_shape)} x {tuple(b_shape)}: neither a 2-D b nor one batch dim"
    return None


def bf16_reason(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """``bf16_rule`` for tensors a [..., M, K] and b [..., N, K] on their device."""
    return bf16_rule(*device_of(a), a.dtype, b.dtype, a.shape, b.shape)


def bf16_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """The exact BF16 path (``bf16_reason`` said yes): FP8 operands upcast to BF16 exactly, FP32 output."""
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if b.dim() == 2:
        y = torch.mm(a16.reshape(-1, a.shape[-1]), b16.mT, out_dtype=torch.float32).reshape(*a.shape[:-1], -1)
    else:
        y = torch.bmm(a16, b16.mT, out_dtype=torch.float32)
    return (y * a_scale * row_scale_as_columns(b_scale)).to(out_dtype)


def _emulated(a, a_scale, b, b_scale, out_dtype: torch.dtype) -> torch.Tensor:
    return emulated(a, a_scale, b, b_scale).to(out_dtype)


# What scaled_gemm runs for each path plan() can give operands that are not block-scaled FP4.
SCALED_GEMMS = {"hopper_fp8": hopper.scaled_gemm, "bf16_exact": bf16_gemm, "emulated": _emulated}


def scaled_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., M, K] x [..., N, K] -> [..., M, N] in ``out_dtype``, on the path ``plan`` gives these tensors."""
    return SCALED_GEMMS[tensor_plan(a, b)[0]](a, a_scale, b, b_scale, out_dtype)


def device_of(t: torch.Tensor) -> tuple[str, tuple[int, int] | None]:
    """(device type, CUDA capability or None) of the device ``t`` is on: what ``plan`` decides by."""
    return t.device.type, torch.cuda.get_device_capability(t.device) if t.device.type == "cuda" else None


def native_block_reason(device_type: str, capability, format: str | None) -> str | None:
    """Why a GEMM of ``format`` operands does not run as a native block-scaled FP4 GEMM (None: it does):
    the capabilities are the kernel's own (``blackwell.NATIVE_MAJORS``)."""
    if format not in NATIVE_FORMATS:
        return f"format {format!r} has no native FP4 kernel"
    from fp4compile.runtime.kernels import blackwell, blackwell_quantize

    if device_type != "cuda" or capability is None or capability[0] not in blackwell.NATIVE_MAJORS:
        return f"no native FP4 kernel for {device_type} {capability or ''}".rstrip() + " (built for sm_10x)"
    if not blackwell_quantize.HAS_TRITON:
        return "triton is not installed"
    return None


# What each GEMM's operands are stored as, per FP4 format (quantize.gemm_operand).
FORMAT_DTYPES = {"vector": torch.float8_e4m3fn, "tensor": torch.float8_e4m3fn, "mxfp4": torch.float8_e4m3fn,
                 "nvfp4": torch.bfloat16}


def plan(device_type: str, capability, format: str | None, a_shape, b_shape, *, dtypes=None,
         alignment: str | None = None) -> tuple[str, str | None]:
    """(path, why not faster) of the GEMM A [..., M, K] @ B [..., N, K]^T on a device of ``capability``
    ((major, minor) or None): "blackwell_fp4", "hopper_fp8", "bf16_exact" or "emulated" (see the module
    doc). ``format``: the operands' FP4 format, or None for operands that are not block-scaled FP4 values
    (a gradient GEMM's); ``dtypes``: (A's, B's) as stored, by default ``format``'s; ``alignment``: why the
    tensors' storage is not aligned (the runtime's, None: aligned). Pure: report.json and ``fp4compile
    doctor`` call it for any device, and the runtime dispatches on its answer (``tensor_plan``)."""
    if any(size == 0 for size in (*a_shape[-2:], b_shape[-2])):
        return "emulated", "an empty GEMM (a zero-size dim): nothing to multiply"
    if len(b_shape) == 2 and native_block_reason(device_type, capability, format) is None:
        return "blackwell_fp4", None
    a_dtype, b_dtype = dtypes or (FORMAT_DTYPES[format],) * 2
    reason = hopper.device_reason(device_type, capability) or (format and hopper.format_reason(format))
    reason = reason or hopper.operands_reason(a_dtype, b_dtype, a_shape, b_shape) or alignment
    if reason is None:
        return "hopper_fp8", None
    if bf16_rule(device_type, capability, a_dtype, b_dtype, a_shape, b_shape) is None:
        return "bf16_exact", reason
    return "emulated", reason


def tensor_plan(a: torch.Tensor, b: torch.Tensor, format: str | None = None) -> tuple[str, str | None]:
    """``plan`` for the operands a [..., M, K], b [..., N, K] as stored (``format`` as in ``plan``)."""
    return plan(*device_of(a), format, a.shape, b.shape, dtypes=(a.dtype, b.dtype),
                alignment=hopper.alignment_reason(a, b))


def block_gemm(va, oa, vb, ob, format: str, native, out_dtype: torch.dtype) -> torch.Tensor:
    """``scaled_gemm`` of ``format`` operands (values va, vb and outer scales oa, ob as quantize.gemm_operand
    returns them), or ``native()`` where ``plan`` says blackwell_fp4: the native block-scaled FP4 GEMM."""
    if tensor_plan(va, vb, format)[0] == "blackwell_fp4":
        return native()
    return scaled_gemm(va, oa, vb, ob, out_dtype)


def native_gemm(va, oa, vb, ob, out_dtype: torch.dtype):
    """The vector format's forward GEMM on sm_10x's native FP4 MMA, b 2-D: the values va, vb with their
    row scales oa, ob in the epilogue."""
    from fp4compile.runtime.kernels import blackwell

    return blackwell.vector_gemm(va, oa, vb, ob, out_dtype)


def native_block(a: torch.Tensor, b: torch.Tensor, format: str) -> bool:
    """Whether the forward GEMM of a [..., M, K], b [N, K] in a block format ("mxfp4", "nvfp4") runs on the
    native block-scaled FP4 kernel here (``plan``): then each operand is quantized once, into the codes and
    scales the kernel reads (``native_block_gemm``)."""
    return format in ("mxfp4", "nvfp4") and plan(*device_of(a), format, a.shape, b.shape)[0] == "blackwell_fp4"


def native_block_gemm(pa, pb, out_dtype: torch.dtype) -> torch.Tensor:
    """The native block-scaled FP4 GEMM of two packed operands (kernels/blackwell_quantize.PackedOperand):
    [M, K] x [N, K] -> [M, N] in ``out_dtype``."""
    from fp4compile.runtime.kernels import blackwell

    return blackwell.block_scaled_mm(pa.packed, pa.scales, pb.packed, pb.scales, pa.tensor_scale, pb.tensor_scale,
                                     pa.format, out_dtype)
