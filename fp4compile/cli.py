"""The ``fp4compile`` command line.

    fp4compile doctor                   versions, the device, and the GEMM path each FP4 format takes on it
    fp4compile doctor --target sm_100   also compile the Blackwell FP4 kernels ahead of time (no GPU needed)
                                        and print, per kernel, the MMA instruction in the PTX and the cubin
                                        size; exit 1 if one does not lower to a native FP4 MMA
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fp4compile.runtime import gemm
from fp4compile.runtime.formats import FORMATS

# The shape the dispatch table is asked about (plan() also checks size rules such as multiples of 16).
PLAN_SHAPE = (4096, 4096, 4096)


def _triton_info() -> tuple[str, str | None]:
    """(triton version or why not, ptxas version line used for sm_100 or None)."""
    try:
        import triton
    except ImportError as e:
        return f"not installed ({e.__class__.__name__}); pip install triton", None
    ptxas = None
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        ptxas = get_ptxas_version(100).strip().splitlines()[-1]
    except Exception as e:  # not fatal: the version is information only
        ptxas = f"unknown ({e.__class__.__name__}: {e})"
    return triton.__version__, ptxas


def _device() -> tuple[str, tuple[int, int] | None, str]:
    """(device type, CUDA capability or None, description)."""
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        return "cuda", cap, f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
    return "cpu", None, "cpu (no CUDA device)"


def _print_dispatch(device_type, capability, label, out):
    print(f"GEMM path per format on {label} (asked for M, N, K = {PLAN_SHAPE}):", file=out)
    for name in FORMATS:
        m, n, k = PLAN_SHAPE
        path, note = gemm.plan(device_type, capability, name, (m, k), (n, k))
        print(f"  {name:<7} -> {path}" + (f"   [{note}]" if note else ""), file=out)


def doctor(targets: list[str], formats: list[str], verbose: bool = False, out=None) -> int:
    out = out or sys.stdout
    triton_version, ptxas = _triton_info()
    device_type, capability, description = _device()
    print("fp4compile doctor", file=out)
    print(f"  torch   {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})", file=out)
    print(f"  triton  {triton_version}", file=out)
    if ptxas:
        print(f"  ptxas   {ptxas} (triton's bundled ptxas for sm_100)", file=out)
    print(f"  device  {description}", file=out)
    _print_dispatch(device_type, capability, f"this device ({description})", out)

    status = 0
    for target in targets:
        from fp4compile.runtime.kernels import blackwell

        try:
            cc = blackwell.parse_target(target)
        except ValueError as e:
            print(f"error: {e}", file=out)
            return 2
        _print_dispatch("cuda", (cc // 10, cc % 10), f"sm_{cc}", out)
        if not blackwell.HAS_TRITON:
            print(f"error: compiling for sm_{cc} needs triton: pip install triton", file=out)
            return 2
        print(f"Ahead-of-time compile of the block-scaled FP4 kernels for sm_{cc}:", file=out)
        for kernel in blackwell.KERNELS:
            for name in formats:
                label = f"{kernel} {name}"
                start = time.perf_counter()
                try:
                    result = blackwell.compile_for(f"sm_{cc}", name, kernel)
                except Exception as e:
                    print(f"  {label:<15} FAILED to compile: {e.__class__.__name__}: {str(e).strip()[-500:]}", file=out)
                    status = 1
                    continue
                seconds = time.perf_counter() - start
                if kernel == "quantize":
                    print(f"  {label:<15} compiled; cubin {result.cubin_size} bytes; {seconds:.1f} s", file=out)
                    continue
                mma = ", ".join(result.mma_instructions) or "no block-scaled FP4 MMA in the PTX"
                verdict = "native FP4 MMA" if result.native else "NOT native (emulated dot_scaled)"
                print(f"  {label:<15} {verdict}: {mma}; cubin {result.cubin_size} bytes; "
                      f"{len(result.mma_lines)} MMA sites; {seconds:.1f} s", file=out)
                if verbose:
                    for line in result.mma_lines:
                        print(f"                  {line}", file=out)
                if not result.native:
                    status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fp4compile", description="FP4 training as a torch.compile backend")
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="versions, device, GEMM dispatch; --target compiles the FP4 kernels AOT")
    doc.add_argument("--target", action="append", default=[],
                     help="compile the Blackwell kernels ahead of time for this CUDA arch, e.g. sm_100 (repeatable)")
    doc.add_argument("--format", action="append", choices=["mxfp4", "nvfp4"], default=None,
                     help="only this block format (repeatable; default both)")
    doc.add_argument("-v", "--verbose", action="store_true", help="print every MMA line found in the PTX")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor(args.target, args.format or ["mxfp4", "nvfp4"], args.verbose)
    return 2


if __name__ == "__main__":
    sys.exit(main())
