"""A joint-graph pass for Inductor: tagged operations are recomputed in the backward, never saved. Every
fp4 compile installs it; its uuid, part of Inductor's cache key, carries fp4compile's code (``code_digest``).

These are tagged (``matmul.recomputed``, a ``torch.fx.traceback.annotate`` that reaches the joint
graph), and this pass marks their nodes MUST_RECOMPUTE:

- Weights' rotations (``FP4Config.rotation``): DGE in the backward needs each weight rotated as the
  forward rotated it. AOTAutograd's CSE merges the two products, and its partitioner never recomputes a
  GEMM, so it would save every rotated weight for the backward: two bytes per parameter. Tagged, the
  backward rotates the weight again, a GEMM of 2 x group FLOPs per weight element.
- With ``FP4Config.recompute_activations``, activations' quantization (and rotation): the backward
  quantizes each activation again from what it keeps anyway (an RMSNorm's input and statistics,
  SwiGLU's inputs, attention's output), instead of keeping its FP8 values. Untagged, the partitioner
  never recomputes the quantize kernel (a custom operator) or a rotation GEMM; tagged without the option,
  a rotation alone had it save the BF16 activation instead of the quantized values.
- With ``FP4Config.recompute_weights``, weights' quantization: from the parameters, which the backward
  keeps anyway (DGE reads them), instead of their FP8 values.
"""

import functools
import hashlib
from pathlib import Path

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

ANNOTATION = {"fp4compile": "recompute"}


def recompute_tagged(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.meta.get("custom", {}).get("fp4compile") == ANNOTATION["fp4compile"]:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


class RecomputeTagged(CustomGraphPass):
    """``recompute_tagged`` as Inductor's ``joint_custom_pre_pass``, after the one already set (if any).
    A CustomGraphPass, so Inductor's FX graph cache keys on it instead of bypassing the cache."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, graph: fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
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
