"""Golden graphs of the rewrite: the graph after the FP4 pass and its per-site table."""

import expecttest
import pytest
import torch
import torch.nn as nn
from conftest import TORCH_2_12, rewritten

from fp4compile import FP4Config
from fp4compile.passes.report import summary_table


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.lm_head = nn.Linear(32, 10)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


class Attention(nn.Module):
    """Every matmul form: F.linear, @ with a transposed view, einsum, bmm, and a weight on the left."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        y = torch.einsum("bhts,bhsd->bhtd", att, v)
        y = torch.bmm(y.flatten(0, 1), v.flatten(0, 1).transpose(1, 2)).softmax(-1) @ v.flatten(0, 1)
        y = y.view(b, self.heads, t, d // self.heads).transpose(1, 2).reshape(b, t, d)
        return (self.out @ y.transpose(1, 2)).transpose(1, 2)


class Conv1D(nn.Module):
    """GPT-2's Conv1D from transformers: addmm with a weight of shape [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.size(-1),)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2MLP(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


class TestGoldenGraphs(expecttest.TestCase):
    def test_mlp(self):
        report, code = rewritten(MLP(), torch.randn(2, 32), config=FP4Config.from_recipe_name("paper", exclude=("lm_head",)))
        self.assertExpectedInline(code, """\
linear = fp4compile_fp4_linear(l_x_, l_self_modules_up_parameters_weight_, l_self_modules_up_parameters_bias_)
relu = torch.relu(linear)
linear_1 = fp4compile_fp4_linear_1(relu, l_self_modules_down_parameters_weight_, None)
linear_2 = torch._C._nn.linear(linear_1, l_self_modules_lm_head_parameters_weight_, l_self_modules_lm_head_parameters_bias_)
return (linear_2,)""")
        self.assertExpectedInline(summary_table(report), """\
fp4compile graph_0_0: 2 fp4, 1 skipped
node      op      module   shapes              weight  status   gemm      reason
linear    linear  up       [2, 32] x [64, 32]  B       fp4      emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
linear_1  linear  down     [2, 64] x [32, 64]  B       fp4      emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
linear_2  linear  lm_head  [2, 32] x [10, 32]  B       skipped  -         module 'lm_head' matched by config.exclude""")

    def test_attention_block_default_keeps_activation_matmuls(self):
        report, code = rewritten(Attention(), torch.randn(2, 8, 32))
        self.assertExpectedInline(code, """\
linear = fp4compile_fp4_linear(l_x_, l_self_modules_qkv_parameters_weight_, l_self_modules_qkv_parameters_bias_)
view = linear.view(2, 8, 3, 2, 16)
permute = view.permute(2, 0, 3, 1, 4)
q = permute[0]
k = permute[1]
v = permute[2]
transpose = k.transpose(-2, -1)
matmul = q @ transpose
att = matmul.softmax(-1)
y = torch.functional.einsum('bhts,bhsd->bhtd', att, v)
flatten = y.flatten(0, 1)
flatten_1 = v.flatten(0, 1)
transpose_1 = flatten_1.transpose(1, 2)
bmm = torch.bmm(flatten, transpose_1)
softmax_1 = bmm.softmax(-1)
flatten_2 = v.flatten(0, 1)
y_1 = softmax_1 @ flatten_2
view_1 = y_1.view(2, 2, 8, 16)
transpose_2 = view_1.transpose(1, 2)
y_2 = transpose_2.reshape(2, 8, 32)
transpose_3 = y_2.transpose(1, 2)
matmul_2 = fp4compile_fp4_matmul(l_self_parameters_out_, transpose_3)
transpose_4 = matmul_2.transpose(1, 2)
return (transpose_4,)""")
        self.assertExpectedInline(summary_table(report), """\
fp4compile graph_0_0: 2 fp4, 4 skipped
node      op      module  shapes                         weight  status   gemm      reason
linear    linear  qkv     [2, 8, 32] x [96, 32]          B       fp4      emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
matmul    matmul  None    [2, 2, 8, 16] x [2, 2, 16, 8]  -       skipped  -         activation x activation matmul (no weight operand); set quantize_activation_matmuls=True to quantize it
y         einsum  None    [2, 2, 8, 8] x [2, 2, 8, 16]   -       skipped  -         activation x activation matmul (no weight operand); set quantize_activation_matmuls=True to quantize it
bmm       bmm     None    [4, 8, 16] x [4, 16, 8]        -       skipped  -         activation x activation matmul (no weight operand); set quantize_activation_matmuls=True to quantize it
y_1       matmul  None    [4, 8, 8] x [4, 8, 16]         -       skipped  -         activation x activation matmul (no weight operand); set quantize_activation_matmuls=True to quantize it
matmul_2  matmul  None    [32, 32] x [2, 32, 8]          A       fp4      emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)""")

    def test_attention_block_with_activation_matmuls(self):
        config = FP4Config.from_recipe_name("paper", quantize_activation_matmuls=True)
        report, code = rewritten(Attention(), torch.randn(2, 8, 32), config=config)
        self.assertExpectedInline(code, """\
linear = fp4compile_fp4_linear(l_x_, l_self_modules_qkv_parameters_weight_, l_self_modules_qkv_parameters_bias_)
view = linear.view(2, 8, 3, 2, 16)
permute = view.permute(2, 0, 3, 1, 4)
q = permute[0]
k = permute[1]
v = permute[2]
transpose = k.transpose(-2, -1)
matmul = fp4compile_fp4_matmul(q, transpose)
att = matmul.softmax(-1)
y = fp4compile_fp4_einsum('bhts,bhsd->bhtd', att, v)
flatten = y.flatten(0, 1)
flatten_1 = v.flatten(0, 1)
transpose_1 = flatten_1.transpose(1, 2)
bmm = fp4compile_fp4_bmm(flatten, transpose_1)
softmax_1 = bmm.softmax(-1)
flatten_2 = v.flatten(0, 1)
y_1 = fp4compile_fp4_matmul_1(softmax_1, flatten_2)
view_1 = y_1.view(2, 2, 8, 16)
transpose_2 = view_1.transpose(1, 2)
y_2 = transpose_2.reshape(2, 8, 32)
transpose_3 = y_2.transpose(1, 2)
matmul_2 = fp4compile_fp4_matmul_2(l_self_parameters_out_, transpose_3)
transpose_4 = matmul_2.transpose(1, 2)
return (transpose_4,)""")
        self.assertExpectedInline(summary_table(report), """\
fp4compile graph_0_0: 6 fp4, 0 skipped
node      op      module  shapes                         weight  status  gemm      reason
linear    linear  qkv     [2, 8, 32] x [96, 32]          B       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
matmul    matmul  None    [2, 2, 8, 16] x [2, 2, 16, 8]  -       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
y         einsum  None    [2, 2, 8, 8] x [2, 2, 8, 16]   -       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
bmm       bmm     None    [4, 8, 16] x [4, 16, 8]        -       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
y_1       matmul  None    [4, 8, 8] x [4, 8, 16]         -       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
matmul_2  matmul  None    [32, 32] x [2, 32, 8]          A       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)""")

    def test_gpt2_conv1d(self):
        report, code = rewritten(GPT2MLP(), torch.randn(2, 8, 32))
        self.assertExpectedInline(code, """\
view = l_x_.view(-1, 32)
x = fp4compile_fp4_addmm(l_self_modules_c_fc_parameters_bias_, view, l_self_modules_c_fc_parameters_weight_)
view_1 = x.view((2, 8, 128))
gelu = torch._C._nn.gelu(view_1)
view_2 = gelu.view(-1, 128)
x_1 = fp4compile_fp4_addmm_1(l_self_modules_c_proj_parameters_bias_, view_2, l_self_modules_c_proj_parameters_weight_)
view_3 = x_1.view((2, 8, 32))
return (view_3,)""")
        self.assertExpectedInline(summary_table(report), """\
fp4compile graph_0_0: 2 fp4, 0 skipped
node  op     module  shapes                 weight  status  gemm      reason
x     addmm  c_fc    [16, 32] x [32, 128]   B       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)
x_1   addmm  c_proj  [16, 128] x [128, 32]  B       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)""")

    @pytest.mark.xfail(not TORCH_2_12, strict=True, reason="Dynamo before torch 2.12 names its nodes differently")
    def test_multihead_attention(self):
        """nn.MultiheadAttention: one site, the op keeps its arguments; its twin quantizes the projections."""
        report, code = rewritten(nn.MultiheadAttention(32, 2, batch_first=True), *[torch.randn(2, 8, 32)] * 3)
        self.assertExpectedInline(code, """\
query = l_args_0_.transpose(1, 0)
multi_head_attention_forward = fp4compile_fp4_multi_head_attention(query, query, query, 32, 2, l_fn_parameters_in_proj_weight_, l_fn_parameters_in_proj_bias_, None, None, False, 0.0, l_fn_modules_out_proj_parameters_weight_, l_fn_modules_out_proj_parameters_bias_, training = True, key_padding_mask = None, need_weights = True, attn_mask = None, average_attn_weights = True, is_causal = False)
attn_output = multi_head_attention_forward[0]
attn_output_weights = multi_head_attention_forward[1]
attn_output_1 = attn_output.transpose(1, 0)
return (attn_output_1, attn_output_weights)""")
        self.assertExpectedInline(summary_table(report), """\
fp4compile graph_0_0: 1 fp4, 0 skipped
node                          op                    module  shapes                 weight  status  gemm      reason
multi_head_attention_forward  multi_head_attention  None    [8, 2, 32] x [32, 32]  B       fp4     emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)""")

    def test_block_format_skips_indivisible_reduction(self):
        model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 16))
        report, _ = rewritten(model, torch.randn(2, 48), config=FP4Config.from_recipe_name("paper", format="mxfp4"))
        self.assertExpectedInline(summary_table(report), """\
fp4compile graph_0_0: 1 fp4, 1 skipped
node     op      module  shapes              weight  status   gemm      reason
input_1  linear  0       [2, 48] x [64, 48]  B       skipped  -         reduction dim of size 48 is not a multiple of mxfp4's block of 32; use format='vector' or pad the dim
input_3  linear  2       [2, 64] x [16, 64]  B       fp4      emulated  device 'cpu' has no FP8 tensor cores (CUDA sm_89+ needed)""")
