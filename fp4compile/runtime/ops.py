"""FP4 twins of torch's matmul ops: the same signature, computed by ``fp4_matmul_nt``.

The graph pass replaces a matmul node by a call of its twin with the node's own arguments, so a rewritten
graph reads like the original. Each twin brings its operands to the A [..., M, K] @ B[..., N, K]^T form.
"""

import contextlib
import functools
import string

import torch.nn.functional as F

from fp4compile.runtime.grouped import fp4_grouped_mm
from fp4compile.runtime.matmul import MatmulSpec, fp4_matmul_nt


def linear(spec: MatmulSpec, x, weight, bias=None):
    lead = x.shape[:-1]
    y = fp4_matmul_nt(x.reshape(-1, x.shape[-1]), weight, bias, spec)
    return y.reshape(*lead, weight.shape[0])


def matmul(spec: MatmulSpec, a, b):
    if b.dim() == 2 and a.dim() > 2:
        # A weight-like right operand: one big GEMM over all leading dims.
        return mm(spec, a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
    return fp4_matmul_nt(a, b.mT, None, spec)


def mm(spec: MatmulSpec, a, b):
    return fp4_matmul_nt(a, b.mT, None, spec)


def addmm(spec: MatmulSpec, input, mat1, mat2, *, beta=1, alpha=1):
    if beta == 1 and alpha == 1:
        return fp4_matmul_nt(mat1, mat2.mT, input, spec)
    # beta * input + alpha * (mat1 @ mat2), where beta = 0 ignores input (its NaNs too), as torch.addmm.
    y = fp4_matmul_nt(mat1, mat2.mT, None, spec)
    y = y if alpha == 1 else y * alpha
    return y if beta == 0 else y + (input if beta == 1 else input * beta)


bmm = mm
baddbmm = addmm


def grouped_mm(spec: MatmulSpec, a, b, offs=None, bias=None, out_dtype=None):
    # The pass only rewrites a 2-D a, a 3-D weight b, given offs and no bias; out_dtype is in spec.out_dtype.
    return fp4_grouped_mm(a, b.mT, offs, spec)


def multi_head_attention(spec: MatmulSpec, *args, **kwargs):
    """``F.multi_head_attention_forward`` (nn.MultiheadAttention) with its projections as FP4 linears:
    torch's own implementation, run with the module-level ``linear`` its projections call pointed at the
    twin. Every linear it calls is a projection of the input (packed or separate q/k/v weights) or of the
    attention's output; its attention products (bmm or scaled_dot_product_attention) stay as they are.
    The pointer is set for the duration of the call only, which runs while AOTAutograd traces the graph
    (the compiled code holds the twin's operations, not this call)."""
    with _linear_as(functools.partial(linear, spec)):
        return F.multi_head_attention_forward(*args, **kwargs)


@contextlib.contextmanager
def _linear_as(twin):
    original = F.linear
    F.linear = twin
    try:
        yield
    finally:
        F.linear = original


def explicit_einsum(equation: str, a_shape, b_shape) -> str:
    """A two-operand einsum with its '...' spelled out in unused letters for operands of these shapes
    (right-aligned, as torch broadcasts them); raise ValueError where a label's sizes differ (a size-1
    broadcast, which the twin's reshapes do not do)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return equation  # parse_einsum names the problem
    ellipsis = "..." in eq
    if ellipsis:
        spare = [c for c in string.ascii_letters if c not in eq]
        counts = [len(shape) - len(t.replace("...", "")) if "..." in t else 0
                  for t, shape in zip(terms, (a_shape, b_shape))]
        dims = "".join(spare[:max(counts)])
        terms = [t.replace("...", dims[len(dims) - n:]) for t, n in zip(terms, counts)]
        if not arrow:  # torch's implicit output: the '...' dims, then the labels used once, sorted
            labels = "".join(terms)
            out = dims + "".join(sorted(c for c in labels if labels.count(c) == 1 and c not in dims))
        eq = f"{terms[0]},{terms[1]}->{out.replace('...', dims)}"
    b_size = dict(zip(terms[1], b_shape))
    for c, n in zip(terms[0], a_shape):
        if c in b_size and b_size[c] != n:
            raise ValueError(f"einsum broadcasting {c!r} ({n} against {b_size[c]}) is not rewritten")
    return eq if ellipsis else equation


def parse_einsum(equation: str):
    """Split a two-operand einsum into (batch, a_free, b_free, contracted, out) index strings, or raise
    ValueError naming what this rewrite does not handle."""
    eq = equation.replace(" ", "")
    if "..." in eq:
        raise ValueError("einsum with '...' is not rewritten")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        raise ValueError(f"einsum with {len(terms)} operands (only 2-operand contractions are rewritten)")
    a, b = terms
    if "->" not in eq:
        out = "".join(sorted(c for c in a + b if (a + b).count(c) == 1))
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        raise ValueError("einsum with a repeated index in one term (a diagonal) is not rewritten")
    contracted = "".join(c for c in a if c in b and c not in out)
    if not contracted:
        raise ValueError("einsum contracts no index (an outer product)")
    if any(c not in out and c not in contracted for c in a + b):
        raise ValueError("einsum sums an index of only one operand")
    batch = "".join(c for c in a if c in b and c in out)
    a_free = "".join(c for c in a if c not in b)
    b_free = "".join(c for c in b if c not in a)
    return batch, a_free, b_free, contracted, out


def einsum(spec: MatmulSpec, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    a, b = operands
    batch, a_free, b_free, contracted, out = parse_einsum(equation)
    a_terms, b_terms = equation.replace(" ", "").partition("->")[0].split(",")
    size = {c: a.shape[a_terms.index(c)] for c in a_terms} | {c: b.shape[b_terms.index(c)] for c in b_terms}

    def canonical(x, terms, free):
        order = [terms.index(c) for c in batch + free + contracted]
        shape = [size[c] for c in batch] + [_prod(size[c] for c in free), _prod(size[c] for c in contracted)]
        return x.permute(order).reshape(shape)

    y = fp4_matmul_nt(canonical(a, a_terms, a_free), canonical(b, b_terms, b_free), None, spec)
    y = y.reshape([size[c] for c in batch + a_free + b_free])
    return y.permute([(batch + a_free + b_free).index(c) for c in out])


def _prod(sizes):
    p = 1
    for s in sizes:
        p = p * s
    return p


TWINS = {
    "linear": linear,
    "matmul": matmul,
    "mm": mm,
    "addmm": addmm,
    "bmm": bmm,
    "baddbmm": baddbmm,
    "einsum": einsum,
    "grouped_mm": grouped_mm,
    "multi_head_attention": multi_head_attention,
}


class FP4Site:
    """The callable a rewritten graph node targets: ``op``'s twin bound to this site's spec."""

    def __init__(self, op: str, spec: MatmulSpec):
        self.op = op
        self.spec = spec
        self.__name__ = self.__qualname__ = f"fp4_{op}"
        self.__module__ = "fp4compile"

    def __call__(self, *args, **kwargs):
        return TWINS[self.op](self.spec, *args, **kwargs)

    def __repr__(self):
        return f"FP4Site({self.op!r}, {self.spec!r})"

