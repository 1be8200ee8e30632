"""A joint-graph pass for Inductor: weights' rotations (``FP4Config.rotation``) are recomputed in the backward, never saved.

With ``FP4Config.rotation``, DGE in the backward needs each weight rotated as the forward rotated it.
AOTAutograd's CSE merges the two products, and its partitioner never recomputes a GEMM, so it would save
every rotated weight for the backward: two bytes per parameter. ``matmul.rotated`` tags a weight's
rotation (a ``torch.fx.traceback.annotate`` that reaches the joint graph); this pass marks those nodes
MUST_RECOMPUTE, so the backward rotates the weight again, a GEMM of 2 x group FLOPs per weight element.
Activations' rotations stay untagged: tagged, the partitioner saved the BF16 activation to recompute its
rotation and quantization, instead of the quantized values.
"""

import hashlib
import inspect

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

ANNOTATION = {"fp4compile": "rotation"}


def recompute_rotations(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.meta.get("custom", {}).get("fp4compile") == ANNOTATION["fp4compile"]:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


class RecomputeRotations(CustomGraphPass):
    """``recompute_rotations`` as Inductor's ``joint_custom_pre_pass``, after the one already set (if any).
    A CustomGraphPass, so Inductor's FX graph cache keys on it instead of bypassing the cache."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, graph: fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        recompute_rotations(graph)

    def uuid(self):
        previous = self.previous.uuid() if isinstance(self.previous, CustomGraphPass) else repr(self.previous)
        return hashlib.sha256((inspect.getsource(recompute_rotations) + str(previous)).encode()).hexdigest()
