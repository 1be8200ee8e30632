"""passes/swiglu.py: SwiGLU's product quantized where it is computed. Golden graphs of the pass on graphs
traced as AOTAutograd traces them (Inductor's decompositions, FakeTensors), and the forms it leaves."""

import expecttest
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from torch._inductor.decomposition import select_decomp_table  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from fp4compile.passes.swiglu import fuse_swiglu_quantize  # noqa: E402
from fp4compile.runtime.kernels.fp4_rows_triton import fp4_rows  # noqa: E402


def _traced(fn, *shapes, dtype=torch.bfloat16):
    inputs = [torch.randn(s, dtype=dtype) for s in shapes]
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*inputs)


def _fused(gm) -> tuple[int, str]:
    count = fuse_swiglu_quantize(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return count, gm.code.strip()


class TestSwigluPass(expecttest.TestCase):
    def test_product_through_views_becomes_one_operator(self):
        def down_operand(gate, up):
            return fp4_rows((F.silu(gate) * up).view(-1, 64))

        count, code = _fused(_traced(down_operand, (2, 8, 64), (2, 8, 64)))
        self.assertEqual(count, 1)
        self.assertExpectedInline(code, """\
def forward(self, gate_1, up_1):
    view_default = torch.ops.aten.view.default(gate_1, [-1, 64]);  gate_1 = None
    view_default_1 = torch.ops.aten.view.default(up_1, [-1, 64]);  up_1 = None
    fp4_rows_swiglu_default = torch.ops.fp4compile.fp4_rows_swiglu.default(view_default, view_default_1);  view_default = view_default_1 = None
    getitem = fp4_rows_swiglu_default[0]
    getitem_1 = fp4_rows_swiglu_default[1]
    getitem_2 = fp4_rows_swiglu_default[2];  fp4_rows_swiglu_default = None
    return (getitem, getitem_1, getitem_2)""")

    def test_rotation_and_operand_order_carry_over(self):
        def down_operand(gate, up, rotation):
            return fp4_rows(up * F.silu(gate), rotation)

        gm = _traced(down_operand, (16, 64), (16, 64), (16, 16))
        self.assertEqual(fuse_swiglu_quantize(gm.graph), 1)
        (fused,) = gm.graph.find_nodes(op="call_function", target=torch.ops.fp4compile.fp4_rows_swiglu.default)
        self.assertEqual([a.name for a in fused.args], ["gate_1", "up_1", "rotation_1"])

    def test_leaves_what_the_kernel_does_not_compute(self):
        """A product another node reads (stored anyway), x * sigmoid(x) (another formula than the kernel's),
        gate and up of two dtypes, and a product of two plain tensors stay as they are."""

        def also_returned(gate, up):
            product = F.silu(gate) * up
            return fp4_rows(product), product

        def sigmoid_form(gate, up):
            return fp4_rows(gate * torch.sigmoid(gate) * up)

        def plain(gate, up):
            return fp4_rows(gate * up)

        for fn in (also_returned, sigmoid_form, plain):
            self.assertEqual(fuse_swiglu_quantize(_traced(fn, (16, 64), (16, 64)).graph), 0, fn.__name__)
        mixed = make_fx(lambda gate, up: fp4_rows(F.silu(gate) * up), decomposition_table=select_decomp_table(),
                        tracing_mode="fake")(torch.randn(16, 64), torch.randn(16, 64, dtype=torch.bfloat16))
        self.assertEqual(fuse_swiglu_quantize(mixed.graph), 0)

    def test_product_the_backward_reads_still_fuses(self):
        """A product that only the backward reads besides the quantize (where the backward quantizes it
        again: matmul.requantized; AOTAutograd tags the joint graph's nodes): fused in the forward, the
        product left to the backward, where the partitioner computes it from gate and up."""

        def down_operand(gate, up):
            product = F.silu(gate) * up
            return fp4_rows(product), product * 2

        gm = _traced(down_operand, (16, 64), (16, 64))
        (quantize,) = gm.graph.find_nodes(op="call_function", target=torch.ops.fp4compile.fp4_rows.default)
        for reader in quantize.args[0].users:
            reader.meta["partitioner_tag"] = "is_backward" if reader is not quantize else "is_forward"
        count, code = _fused(gm)
        self.assertEqual(count, 1)
        self.assertExpectedInline(code, """\
def forward(self, gate_1, up_1):
    convert_element_type = torch.ops.prims.convert_element_type.default(gate_1, torch.float32)
    neg = torch.ops.aten.neg.default(convert_element_type)
    exp = torch.ops.aten.exp.default(neg);  neg = None
    add = torch.ops.aten.add.Tensor(exp, 1);  exp = None
    div = torch.ops.aten.div.Tensor(convert_element_type, add);  convert_element_type = add = None
    convert_element_type_1 = torch.ops.prims.convert_element_type.default(div, torch.bfloat16);  div = None
    mul = torch.ops.aten.mul.Tensor(convert_element_type_1, up_1);  convert_element_type_1 = None
    fp4_rows_swiglu_default = torch.ops.fp4compile.fp4_rows_swiglu.default(gate_1, up_1);  gate_1 = up_1 = None
    getitem = fp4_rows_swiglu_default[0]
    getitem_1 = fp4_rows_swiglu_default[1]
    getitem_2 = fp4_rows_swiglu_default[2];  fp4_rows_swiglu_default = None
    mul_1 = torch.ops.aten.mul.Tensor(mul, 2);  mul = None
    return ((getitem, getitem_1, getitem_2), mul_1)""")

    def test_float32_product_and_silu_undecomposed(self):
        def down_operand(gate, up):
            return fp4_rows(F.silu(gate) * up)

        gm = _traced(down_operand, (16, 64), (16, 64), dtype=torch.float32)
        self.assertEqual(fuse_swiglu_quantize(gm.graph), 1)
        gm = make_fx(down_operand, tracing_mode="fake")(torch.randn(16, 64), torch.randn(16, 64))
        self.assertEqual([n.target for n in gm.graph.nodes if n.op == "call_function"][:2],
                         [torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor])
        self.assertEqual(fuse_swiglu_quantize(gm.graph), 1)
