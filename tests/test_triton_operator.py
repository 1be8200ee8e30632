"""kernels/triton_operator.py on any machine: the Triton-kernel operators get Inductor lowerings, and a torch
without the internals those build on keeps the operator calls with a warning. The lowered launches run
in the GPU tests (test_hopper.py: no operator call left in a compiled step, dynamic shapes)."""

import pytest
import torch

pytest.importorskip("triton")

from fp4compile.runtime.kernels import fp4_rows_triton, fp8_grad_triton, transpose_triton  # noqa: E402,F401
from fp4compile.runtime.kernels import triton_operator  # noqa: E402

OPS = (torch.ops.fp4compile.fp8_grad_operands.default, torch.ops.fp4compile.fp4_rows.default,
       torch.ops.fp4compile.transpose_bytes.default)


def test_every_operator_gets_a_lowering():
    from torch._inductor.lowering import lowerings

    triton_operator.register_lowerings.cache_clear()
    assert triton_operator.register_lowerings()
    assert set(OPS) <= set(triton_operator._BODIES)
    for op in OPS:
        assert lowerings[op].__name__ == "lower", op


def test_missing_torch_internals_keep_the_calls(monkeypatch):
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    monkeypatch.delattr(type(wrap.kernel_side_table), "add_constant_args")
    triton_operator.register_lowerings.cache_clear()
    try:
        with pytest.warns(UserWarning, match="operator calls"):
            assert not triton_operator.register_lowerings()
    finally:
        monkeypatch.undo()
        triton_operator.register_lowerings.cache_clear()


def test_lowered_launch_keeps_its_warps(monkeypatch):
    """Inductor compiles a user-defined kernel with 4 warps whatever the launch passes as an argument, so
    the lowering hands num_warps over as Dynamo does: in a one-config autotuner (the same object for the
    same kernel and options), not among the constexprs."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
    from torch._inductor.lowering import lowerings
    from triton.runtime.autotuner import Autotuner

    launches = []
    monkeypatch.setitem(lowerings, triton_kernel_wrapper_mutation, lambda **kw: launches.append(kw))
    meta = {"BLOCK_M": 1, "num_warps": 8}
    for _ in range(2):
        triton_operator.Lowering.run(fp4_rows_triton._fp4_rows_kernel, (3,), {"M": 3}, meta)
    kernel = kernel_side_table.get_kernel(launches[0]["kernel_idx"])
    assert isinstance(kernel, Autotuner) and kernel.fn is fp4_rows_triton._fp4_rows_kernel
    assert [(c.num_warps, c.kwargs) for c in kernel.configs] == [(8, {})]
    assert kernel_side_table.get_constant_args(launches[0]["constant_args_idx"]) == {"BLOCK_M": 1}
    assert launches[1]["kernel_idx"] == launches[0]["kernel_idx"] and meta == {"BLOCK_M": 1, "num_warps": 8}
    triton_operator.Lowering.run(fp4_rows_triton._fp4_rows_kernel, (3,), {"M": 3}, {"BLOCK_M": 1})
    assert kernel_side_table.get_kernel(launches[2]["kernel_idx"]) is fp4_rows_triton._fp4_rows_kernel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor lowers the operators on CUDA")
def test_gpu_compiled_launch_runs_with_the_operators_warps():
    """fp4_rows on rows of 14336 launches with 8 warps (fp4_rows_triton._launch_shape) from Inductor's code
    too, with the eager call's bits."""
    from torch._inductor.utils import run_and_get_code

    assert triton_operator.register_lowerings()
    x = torch.randn(64, 14336, device="cuda", dtype=torch.bfloat16)
    (values, *scales), (code,) = run_and_get_code(torch.compile(fp4_rows_triton.fp4_rows, dynamic=False), x)
    assert fp4_rows_triton._launch_shape(14336, False)[2] == 8 and "'num_warps': 8" in code
    want_values, *want_scales = fp4_rows_triton.fp4_rows(x)
    assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
    assert all(torch.equal(got, want) for got, want in zip(scales, want_scales, strict=True))
