"""Tagged operations are recomputed in the backward, never saved: a pass over AOTAutograd's joint graph
(passes/joint.py runs it).

These are tagged (``matmul.recomputed``, a ``torch.fx.traceback.annotate`` that reaches the joint
graph), and this pass marks their nodes MUST_RECOMPUTE:

- Weights' rotations (``FP4Config.rotation``): DGE in the backward needs each weight rotated as the
  forward rotated it. AOTAutograd's CSE merges the two products, and its partitioner never recomputes a
  GEMM, so it would save every rotated weight for the backward: two bytes per parameter. Tagged, the
  backward rotates the weight again, a GEMM of 2 x group FLOPs per weight element.
- With ``FP4Config.recompute_activations``, activations' quantization (and rotation) where the backward
  does not round them again from the forward's scales itself (``matmul.requantized``: rotated
  activations, block formats): the backward quantizes each activation again from what it keeps anyway
  (an RMSNorm's input and statistics, SwiGLU's inputs, attention's output), instead of keeping its FP8
  values. Untagged, the partitioner never recomputes the quantize kernel (a custom operator) or a
  rotation GEMM; tagged without the option, a rotation alone had it save the BF16 activation instead of
  the quantized values.
- With ``FP4Config.recompute_weights``, likewise weights' quantization in the block formats and MoE
  experts' (``grouped.FP4GroupedMM``): from the parameters, which the backward keeps anyway (DGE reads
  them), instead of their FP8 values.
"""

import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

ANNOTATION = {"fp4compile": "recompute"}


def recompute_tagged(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.meta.get("custom", {}).get("fp4compile") == ANNOTATION["fp4compile"]:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE

