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
