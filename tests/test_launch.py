"""kernels/launch.py's cache key: a compiled kernel is reused only for arguments Triton would specialize
the same way (dtype and 16-byte alignment of each tensor; integers equal to 1, divisible by 16, or
beyond int32), so no launch runs code compiled under assumptions its arguments break. The cached
launches themselves run in the GPU tests of the operators that use them (test_fp4_rows_kernel.py,
test_fp8_grad_kernel.py, test_hopper.py)."""

import pytest
import torch

pytest.importorskip("triton")

from fp4compile.runtime.kernels import launch as launch_module  # noqa: E402
from fp4compile.runtime.kernels.launch import _specialization, launch  # noqa: E402


def test_tensors_differ_by_dtype_and_alignment():
    buf = torch.zeros(64, dtype=torch.uint8)
    aligned, offset = buf[16:32], buf[1:17]
    assert _specialization(aligned) == _specialization(buf[32:48])
    assert _specialization(aligned) != _specialization(offset)
    assert _specialization(aligned) != _specialization(aligned.view(torch.int8))


@pytest.mark.parametrize("a, b, same", [(16, 4096, True), (17, 33, True), (16, 17, False), (1, 17, False),
                                        (2**31 - 16, 2**31, False), (0, 16, True)])
def test_integers_differ_where_triton_specializes(a, b, same):
    assert (_specialization(a) == _specialization(b)) == same


def test_other_arguments_by_value():
    assert _specialization(None) == _specialization(None)
    assert _specialization(True) != _specialization(1)
    assert _specialization(0.5) != _specialization(0.25)


def test_a_launcher_without_the_internals_goes_through_the_jit_every_call(monkeypatch):
    """Where Triton moved the compiled kernel's launcher internals (or under its interpreter, whose JIT call
    returns None), the fast path is never taken: each launch is the JIT call."""
    calls = []

    class Kernel:  # a JIT function whose compiled kernel lacks run/function/packed_metadata/launch_metadata
        arg_names = ["x", "n"]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs)) or object()

    monkeypatch.setattr(launch_module, "_compiled", {})
    fn, x = Kernel(), torch.zeros(4)
    for _ in range(3):
        launch(fn, (1,), (x, 4), {}, 4)
    assert len(calls) == 3 and launch_module._compiled == {(fn, x.device, (_specialization(x), _specialization(4)), (), 4): None}
