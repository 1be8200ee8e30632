"""The ``fp4compile`` command line.

    fp4compile doctor                   versions, the device, and the GEMM path each FP4 format takes on it
    fp4compile doctor --target sm_100   also compile the Blackwell FP4 kernels ahead of time (no GPU needed)
                                        and print, per kernel, the MMA instruction in the PTX and the cubin
                                        size; exit 1 if one does not lower to a native FP4 MMA,
                                        exit 2 with a one-line reason if it cannot compile for the target
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import fp4compile
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
        from fp4compile import aot
        from fp4compile.runtime.kernels import blackwell_quantize

        try:
            cc = aot.parse_target(target)
        except ValueError as e:
            print(f"error: {e}", file=out)
            return 2
        _print_dispatch("cuda", (cc // 10, cc % 10), f"sm_{cc}", out)
        if not blackwell_quantize.HAS_TRITON:
            print(f"error: compiling for sm_{cc} needs triton: pip install triton", file=out)
            return 2
        print(f"Ahead-of-time compile of the block-scaled FP4 kernels for sm_{cc}:", file=out)
        results, error = _compile_in_child(cc, formats)
        if error:
            print(f"error: cannot compile for sm_{cc}: {error}", file=out)
            return 2
        for r in results:
            label = f"{r['kernel']} {r['format']}"
            if "error" in r:
                print(f"  {label:<15} FAILED to compile: {r['error']}", file=out)
                status = 1
            elif r["kernel"] == "quantize":
                print(f"  {label:<15} compiled; cubin {r['cubin_size']} bytes; {r['seconds']:.1f} s", file=out)
            else:
                mma = ", ".join(r["mma_instructions"]) or "no block-scaled FP4 MMA in the PTX"
                verdict = "native FP4 MMA" if r["native"] else "NOT native (emulated dot_scaled)"
                print(f"  {label:<15} {verdict}: {mma}; cubin {r['cubin_size']} bytes; "
                      f"{len(r['mma_lines'])} MMA sites; {r['seconds']:.1f} s", file=out)
                if verbose:
                    for line in r["mma_lines"]:
                        print(f"                  {line}", file=out)
                if not r["native"]:
                    status = 1
    return status

COMPILE_TIMEOUT_S = 600


def _compile_in_child(cc: int, formats: list[str]) -> tuple[list[dict], str | None]:
    """Compile every kernel for sm_<cc> in a child process: LLVM aborts the whole process on some
    inputs (an exit by SIGABRT, not an exception), and the doctor must still answer with a reason.
    Returns (one dict per kernel, None) or ([], a one-line reason)."""
    root = str(Path(fp4compile.__file__).resolve().parents[1])  # the child imports this same copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = "import sys; from fp4compile.cli import _compile_report; _compile_report(int(sys.argv[1]), sys.argv[2:])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(cc), *formats], capture_output=True, text=True,
                              env=env, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [], f"triton's compiler did not finish within {COMPILE_TIMEOUT_S} s"
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "ERROR" in line or "Error" in line), lines[-1] if lines else "")
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return [], f"triton's compiler stopped ({how}): {last[:300]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], None


def _compile_report(cc: int, formats: list[str]) -> None:
    """The child's side of _compile_in_child: one JSON line per kernel and format on stdout."""
    from fp4compile import aot

    for kernel in aot.KERNELS:
        for name in (f for f in formats if f in aot.KERNEL_FORMATS[kernel]):
            row = {"kernel": kernel, "format": name}
            start = time.perf_counter()
            try:
                result = aot.compile_for(f"sm_{cc}", name, kernel)
            except Exception as e:
                row["error"] = f"{e.__class__.__name__}: {str(e).strip()[-500:]}"
            else:
                row.update(native=result.native, mma_instructions=list(result.mma_instructions),
                           mma_lines=list(result.mma_lines), cubin_size=result.cubin_size,
                           seconds=time.perf_counter() - start)
            print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fp4compile", description="FP4 training as a torch.compile backend")
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="versions, device, GEMM dispatch; --target compiles the FP4 kernels AOT")
    doc.add_argument("--target", action="append", default=[],
                     help="compile the Blackwell kernels ahead of time for this CUDA arch, e.g. sm_100 (repeatable)")
    doc.add_argument("--format", action="append", choices=["mxfp4", "nvfp4", "vector"], default=None,
                     help="only this format (repeatable; default all three)")
    doc.add_argument("-v", "--verbose", action="store_true", help="print every MMA line found in the PTX")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor(args.target, args.format or ["mxfp4", "nvfp4", "vector"], args.verbose)
    return 2


if __name__ == "__main__":
    sys.exit(main())
