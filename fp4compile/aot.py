"""Ahead-of-time compilation of the Blackwell FP4 kernels (runtime/kernels/blackwell.py's GEMM and
blackwell_quantize.py's quantizer) for any CUDA target on any machine, the triton wheel carrying ptxas:
:func:`compile_for` returns the PTX and its native block-scaled FP4 MMA instructions. Tooling for
``fp4compile doctor --target`` and the tests; the runtime does not import it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess

from fp4compile.runtime.formats import get_format
from fp4compile.runtime.kernels.blackwell import DEFAULT_CONFIG, _block_scaled_gemm_kernel
from fp4compile.runtime.kernels.blackwell_quantize import HAS_TRITON, BlockFormat, _quantize_kernel, gemm_format

if HAS_TRITON:
    import triton

# The native block-scaled FP4 MMAs: tcgen05.mma on sm_100/sm_103 (datacenter Blackwell), mma.sync on sm_120.
# Their scale-vector suffix says how many K-elements share a scale: Triton 3.6 prints "scale_vec::2X" (32,
# in a K = 64 MMA) / "scale_vec::4X" (16); later versions ".block32" / ".block16". sm_100 uses kind::mxf4
# for MXFP4 and kind::mxf4nvf4 for NVFP4; sm_120 uses kind::mxf4nvf4 for both (MXFP4 with ue8m0 scales).
_NATIVE_MMA = re.compile(
    r"^[ \t]*(?:@!?%p\d+[ \t]+)?((?:tcgen05\.mma|mma\.sync)\S*kind::(mxf4nvf4|mxf4)\.block_scale\S*)", re.M
)


def mma_block_size(instruction: str) -> int | None:
    """K-elements per scale of a block-scaled FP4 MMA opcode (32 or 16), None if it does not say."""
    if ".block16" in instruction or "scale_vec::4X" in instruction:
        return 16
    if ".block32" in instruction or "scale_vec::2X" in instruction:
        return 32
    return 32 if "kind::mxf4.block_scale" in instruction else None  # kind::mxf4's default: 2X


@dataclasses.dataclass(frozen=True)
class AOTResult:
    """What :func:`compile_for` found: the PTX, its native FP4 MMA instructions and the cubin size."""

    kernel: str  # "gemm" or "quantize"
    format: str
    target: str
    ptx: str
    mma_instructions: tuple[str, ...]  # distinct block-scaled FP4 MMA opcodes in the PTX
    mma_lines: tuple[str, ...]  # every PTX line holding one
    cubin_size: int
    block_size: int  # the format's K-elements per scale

    @property
    def native(self) -> bool:
        """True when the PTX multiplies E2M1 natively, with this format's scale block size."""
        return any(mma_block_size(op) == self.block_size for op in self.mma_instructions)


def parse_target(target: str | int) -> int:
    """"sm_100", "sm_100a", "100" or 100 -> 100, for a target the installed Triton can compile for.

    Triton passes any number on to LLVM, which aborts the process on an architecture it does not know
    ("sm_1000"), and Triton's tensor-core lowering starts at sm_80 (compiling dot_scaled for sm_75 did
    not finish in 5 minutes), so a target is checked here against the ptxas Triton uses for it."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(target).strip().lower())
    if not m:
        raise ValueError(f"target must look like 'sm_100' (a CUDA compute capability), got {target!r}")
    cc = int(m.group(1))
    known = compilable_targets()
    if known and cc not in known:
        raise ValueError(f"triton {triton.__version__} cannot compile for sm_{cc}; it can for "
                         + ", ".join(f"sm_{c}" for c in known))
    return cc


@functools.cache
def compilable_targets() -> tuple[int, ...]:
    """Capabilities from sm_80 on that the ptxas Triton picks for each (its ``--help`` lists them);
    () without triton, or when ptxas cannot be run (then every target is tried)."""
    if not HAS_TRITON:
        return ()
    from triton.backends.nvidia.compiler import get_ptxas

    known = set()
    for low, high, probe in ((80, 90, 80), (90, 10**9, 100)):  # Triton's ptxas below sm_90, and from sm_90
        try:
            text = subprocess.run([get_ptxas(probe).path, "--help"], capture_output=True, text=True,
                                  timeout=60).stdout
        except (OSError, subprocess.SubprocessError, RuntimeError):
            return ()
        known |= {int(cc) for cc in re.findall(r"'sm_(\d+)'", text) if low <= int(cc) < high}
    return tuple(sorted(known))


# The formats each kernel takes: the quantize kernel writes block formats; the vector format's codes come
# from split_vector.
KERNEL_FORMATS = {"gemm": ("mxfp4", "nvfp4", "vector"), "quantize": ("mxfp4", "nvfp4")}
KERNELS = tuple(KERNEL_FORMATS)


def _gemm_source(fmt: BlockFormat, cfg: dict):
    fn = _block_scaled_gemm_kernel
    if cfg["BLOCK_K"] % fmt.block_size or cfg["BLOCK_K"] % 64:
        raise ValueError(f"BLOCK_K must be a multiple of 64 and of the block size {fmt.block_size}, "
                         f"got {cfg['BLOCK_K']}")
    scale = "*fp32" if fmt.name == "vector" else "*u8"  # FP32 row scales, or block scale bytes
    signature = {
        "a_ptr": "*u8", "a_scale_ptr": scale, "b_ptr": "*u8", "b_scale_ptr": scale,
        "c_ptr": "*fp32", "a_ts_ptr": "*fp32", "b_ts_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32",
        "stride_am": "i32", "stride_asm": "i32", "stride_bn": "i32", "stride_bsn": "i32", "stride_cm": "i32",
    }
    constexprs = {"VEC": fmt.block_size, "HAS_TENSOR_SCALE": fmt.name == "nvfp4", "ROW_SCALES": fmt.name == "vector",
                  **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}}
    if fmt.name != "nvfp4":  # launched with None tensor scales, which Triton specializes as constants
        constexprs.update(a_ts_ptr=None, b_ts_ptr=None)
    # What the JIT infers for 16-byte aligned pointers and strides/K divisible by 16 (the common case).
    aligned = ("a_ptr", "a_scale_ptr", "b_ptr", "b_scale_ptr", "c_ptr", "K", "stride_am", "stride_asm", "stride_bn",
               "stride_bsn", "stride_cm")
    if fmt.name == "vector":  # the row scales' strides are 1
        aligned = tuple(name for name in aligned if name not in ("stride_asm", "stride_bsn"))
    return fn, signature, constexprs, aligned


def _quantize_source(fmt: BlockFormat, cfg: dict):
    fn = _quantize_kernel
    block_r, block_k = cfg.get("BLOCK_R", 32), cfg.get("BLOCK_K", 128)
    if block_k % fmt.block_size:
        raise ValueError(f"BLOCK_K must be a multiple of the block size {fmt.block_size}, got {block_k}")
    signature = {"x_ptr": "*" + cfg.get("in_dtype", "bf16"), "q_ptr": "*u8", "s_ptr": "*u8", "ts_ptr": "*fp32",
                 "R": "i32", "K": "i32", "stride_xr": "i32", "stride_qr": "i32", "stride_sr": "i32"}
    constexprs = {"VEC": fmt.block_size, "BLOCK_R": block_r, "BLOCK_K": block_k}
    if fmt.name == "mxfp4":
        constexprs["ts_ptr"] = None
    aligned = ("x_ptr", "q_ptr", "s_ptr", "K", "stride_xr", "stride_qr")
    return fn, signature, constexprs, aligned


def compile_for(target: str | int = "sm_100", format: str = "mxfp4", kernel: str = "gemm", **config) -> AOTResult:
    """Compile a kernel ("gemm" or "quantize", see KERNEL_FORMATS) for ``target`` ahead of time (no GPU
    needed) and inspect its PTX. ``config`` overrides the tile sizes (DEFAULT_CONFIG for the GEMM; BLOCK_R,
    BLOCK_K and the input dtype ``in_dtype`` ("bf16", "fp32") for the quantizer).

    Uses ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``.
    """
    if not HAS_TRITON:
        raise RuntimeError("ahead-of-time compilation needs triton: pip install triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = parse_target(target)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    get_format(format)  # unknown names: the same error as everywhere else
    if format not in KERNEL_FORMATS[kernel]:
        raise ValueError(f"the {kernel} kernel takes the formats {KERNEL_FORMATS[kernel]}, got {format!r}")
    fmt = gemm_format(format)
    cfg = {**DEFAULT_CONFIG, **config} if kernel == "gemm" else dict(config)
    fn, signature, constexprs, aligned = (_gemm_source if kernel == "gemm" else _quantize_source)(fmt, cfg)
    signature.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)})
    ptx = compiled.asm["ptx"]
    lines = tuple(line.strip() for line in ptx.splitlines() if _NATIVE_MMA.match(line))
    ops = tuple(dict.fromkeys(m.group(1) for m in _NATIVE_MMA.finditer(ptx)))
    return AOTResult(kernel, fmt.name, f"sm_{cc}", ptx, ops, lines, len(compiled.asm["cubin"]), fmt.block_size)
