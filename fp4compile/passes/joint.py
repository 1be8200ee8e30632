"""The passes over AOTAutograd's joint graph (forward and backward, before its partitioner splits them)
that every fp4 compile installs as Inductor's ``joint_custom_pre_pass``, after the one already set (if
any): SwiGLU products fused into their quantize (passes/swiglu.py), then tagged operations marked for
recomputation (passes/recompute.py). Its uuid, part of Inductor's cache key, carries fp4compile's code
(``code_digest``)."""

import functools
import hashlib
from pathlib import Path

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from fp4compile.passes.recompute import recompute_tagged
from fp4compile.passes.swiglu import fuse_swiglu_quantize


class JointPasses(CustomGraphPass):
    """A CustomGraphPass, so that Inductor's FX graph cache keys on it instead of bypassing the cache."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, graph: fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        fuse_swiglu_quantize(graph)
        recompute_tagged(graph)

    def uuid(self):
        previous = self.previous.uuid() if isinstance(self.previous, CustomGraphPass) else repr(self.previous)
        return hashlib.sha256((code_digest() + str(previous)).encode()).hexdigest()


@functools.cache
def code_digest() -> str:
    """A hash of fp4compile's Python sources. Inductor's FX graph cache keys on the graph, not on the
    operators it calls: a cached graph compiled against another version of fp4compile's custom operators
    (a changed schema, say) would be served and fail, or run stale code. Keyed on this, any change to
    fp4compile compiles afresh."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()
