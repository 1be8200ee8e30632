"""The one-launch grouped GEMM kernel (kernels/grouped_triton.py) against ``grouped_mm_fp32``'s per-expert
loop on CPU: on a CUDA device, and on CPU in Triton's interpreter (in a subprocess: the interpreter must be
chosen before triton is imported).

Both forms (rows: a [S, K] x b [E, N, K]; weight: a [N, S] x b [S, K] -> [E, N, K]) over group sizes that
are not multiples of the tiles, empty experts (first, middle, last), one-row groups, rows past offs[-1],
33 experts, a single expert, all experts empty and none; b = w.mT of [E, K, N] and a = dy.mT of [S, N] as strided views;
dtype pairs e5m2 x e4m3, e4m3 x e4m3, bf16 x bf16, fp32 x fp32 (one BF16 tensor-core path, one IEEE FP32).

Comparisons: bit-exact on operands whose partial sums are exact in FP32 in any order (integers in
[-8, 8] times 2^-2..2^2: sums of 40 products need 20 bits), so summation order cannot matter; on random
normal operands within 2 K u sum|a||b| per element (u = 2^-24), twice the bound of a recursive FP32
sum, since both sides round. The FP8 upcasts the kernel does (to FP32 and through BF16) are checked
exact on all 256 codes (the finite ones in the interpreter, which decodes E4M3's NaN as 480). Run as
``TRITON_INTERPRET=1 python tests/test_grouped_kernel.py``, this file prints the interpreter results.
"""

import json
import re

import pytest
import torch
from conftest import run_interpreted

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fp4compile.runtime.grouped import grouped_mm_fp32  # noqa: E402
from fp4compile.runtime.kernels import grouped_triton  # noqa: E402
from fp4compile.runtime.kernels.grouped_triton import grouped_mm  # noqa: E402

S, K, N = 75, 40, 24  # no multiple of the interpreter's 16 x 16 x 16 tiles
OFFS = {  # cumulative group ends (S = 75)
    "empty first": [0, 20, 51, 75],
    "empty middle, one-row group": [20, 20, 21, 75],
    "empty last, rows past offs[-1]": [1, 41, 62, 62],
    "one expert": [75],
    "one expert, rows past offs[-1]": [33],
    "all empty": [0, 0, 0],
    "no experts": [],
    # one more than a power of two (the tile search's vector of segments pads to 64)
    "33 experts": sorted((i * 37) % (S + 1) for i in range(33)),
}
PAIRS = [(torch.float8_e5m2, torch.float8_e4m3fn), (torch.float8_e4m3fn, torch.float8_e4m3fn),
         (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]


def _values(shape, exact: bool, g: torch.Generator) -> torch.Tensor:
    if exact:
        ints = torch.randint(-8, 9, shape, generator=g).float()
        return ints * torch.exp2(torch.randint(-2, 3, shape, generator=g).float())
    return torch.randn(shape, generator=g)


def _operands(form: str, transposed: bool, e: int, a_dtype, b_dtype, exact: bool, device: str, seed: int):
    """(a, b) of the form in the given dtypes; ``transposed``: b = w.mT of [E, K, N] (rows form), a =
    dy.mT of [S, N] (weight form)."""
    g = torch.Generator().manual_seed(seed)
    if form == "rows":
        a = _values((S, K), exact, g)
        b = _values((e, K, N), exact, g).mT if transposed else _values((e, N, K), exact, g)
    else:
        a = _values((S, N), exact, g).mT if transposed else _values((N, S), exact, g)
        b = _values((S, K), exact, g)
    a, b = a.to(device=device, dtype=a_dtype), b.to(device=device, dtype=b_dtype)
    view = b if form == "rows" else a
    assert view.numel() == 0 or view.is_contiguous() != transposed  # .to kept the view's strides
    return a, b


def _compare(a, b, offs) -> list:
    """[shape equal, bits equal, largest error / the FP32 bound (0: none)] against the CPU loop."""
    got = grouped_mm(a, b, offs).cpu()
    a, b, offs = a.cpu(), b.cpu(), offs.cpu()
    want = grouped_mm_fp32(a, b, offs)
    if got.shape != want.shape:
        return [False, False, float("inf")]
    bound = 2 * a.shape[1] * 2.0**-24 * grouped_mm_fp32(a.float().abs(), b.float().abs(), offs)
    err = (got - want).abs()
    ratio = (err / bound).nan_to_num(0.0, posinf=float("inf")).max().item() if err.numel() else 0.0
    return [True, torch.equal(got, want), ratio]


def _all_cases(device: str) -> dict:
    results = {}
    for i, (name, ends) in enumerate(OFFS.items()):
        offs = torch.tensor(ends, dtype=torch.int32, device=device)
        for a_dtype, b_dtype in PAIRS:
            pair = f"{str(a_dtype)[6:]} x {str(b_dtype)[6:]}"
            for form in ("rows", "weight"):
                for exact in (True, False):
                    transposed = (i + exact) % 2 == 1  # each case, form and data in both layouts
                    a, b = _operands(form, transposed, len(ends), a_dtype, b_dtype, exact, device, seed=i)
                    key = f"{form} {name} {pair} {'exact' if exact else 'random'}{' transposed' if transposed else ''}"
                    results[key] = _compare(a, b, offs)
    results["upcasts"] = _upcasts(device)
    return results


@triton.jit
def _upcast_kernel(x_ptr, y_ptr, FP8: tl.constexpr, BF16: tl.constexpr):
    i = tl.arange(0, 256)
    tl.store(y_ptr + i, grouped_triton._upcast(tl.load(x_ptr + i), FP8, BF16).to(tl.float32))


def _upcasts(device: str) -> dict:
    """Whether the kernel's upcast of each FP8 code (to FP32, and through BF16) is its value: [over the
    finite codes, over inf and NaN]."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = {}
    for dtype, kind in grouped_triton._FP8_KIND.items():
        want = codes.view(dtype).float()
        for bf16 in (False, True):
            y = torch.empty(256, dtype=torch.float32, device=device)
            _upcast_kernel[(1,)](codes.to(device), y, FP8=kind, BF16=bf16)
            y = y.cpu()
            same, finite = (y == want) | (y.isnan() & want.isnan()), want.isfinite()
            name = f"{str(dtype)[6:]} {'bf16' if bf16 else 'fp32'}"
            out[name] = [bool(same[finite].all()), bool(same[~finite].all())]
    return out


def _check(results: dict, interpreted: bool) -> None:
    upcasts = results.pop("upcasts")
    assert len(upcasts) == 4, upcasts
    for name, (finite, special) in upcasts.items():
        # The interpreter decodes E4M3's NaN (0x7f) as 480, where a GPU gives NaN: only the finite codes
        # are checked there.
        assert finite and (special or interpreted), (name, finite, special)
    assert len(results) == len(OFFS) * len(PAIRS) * 2 * 2
    for name, (shape_ok, bits_ok, ratio) in results.items():
        assert shape_ok, name
        if "exact" in name:
            assert bits_ok, (name, ratio)
        else:
            assert ratio <= 1.0, (name, ratio)


def test_interpreter_matches_the_loop():
    _check(run_interpreted(__file__), interpreted=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_the_loop():
    _check(_all_cases("cuda"), interpreted=False)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16_dot", "ieee_dot"])
def test_compiles_ahead_of_time_for_hopper(bf16):
    """On any machine: both kernels build for sm_90 at their default tiles; FP8 x FP8 multiplies on the
    BF16 wgmma (FP32 accumulator), FP32 x FP32 with no tensor-core instruction (IEEE, no TF32)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = "*u8" if bf16 else "*fp32"
    common = {"a_ptr": ptr, "b_ptr": ptr, "offs_ptr": "*i32", "out_ptr": "*fp32", "S": "i32", "N": "i32", "K": "i32"}
    kernels = (
        (grouped_triton._rows_kernel, "rows", {**common, "E": "i32", "stride_as": "i32", "stride_be": "i32",
                                               "stride_bn": "i32", "stride_os": "i32"}, ("stride_ak", "stride_bk")),
        (grouped_triton._weight_kernel, "weight", {**common, "stride_an": "i32", "stride_bs": "i32"},
         ("stride_as", "stride_bk")),
    )
    for kernel, form, signature, unit_strides in kernels:
        cfg = grouped_triton.CONFIGS[form, bf16]
        constexprs = {**dict.fromkeys(unit_strides, 1), "A_FP8": 2 if bf16 else 0, "B_FP8": 1 if bf16 else 0,
                      "BF16_DOT": bf16, "INTERPRETED": False, **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}}
        if form == "rows":
            constexprs["BLOCK_E"] = 256  # 128 experts
        compiled = triton.compile(
            ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        ptx = compiled.asm["ptx"]
        mma = set(re.findall(r"\b(?:wgmma\.mma_async|mma)\.\S+", ptx))
        if bf16:
            assert mma and all(m.endswith(".f32.bf16.bf16") for m in mma), (form, mma)
        else:
            assert not mma and "tf32" not in ptx, (form, mma)


if __name__ == "__main__":
    print(json.dumps(_all_cases("cpu")))
