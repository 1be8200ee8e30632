"""Which of a model's weight matrices the fp4 backend has seen as a site's weight, in this process.

A report lists the matmuls of the graphs the backend received; a matmul Dynamo ran eagerly (a graph break
inside a checkpointed region, a module it did not compile, an expert loop it split off) is in none of
them. The parameters are what both sides share: the pass records here what each compiled graph did with
each parameter it holds, and :func:`coverage` lists a model's weight matrices by it, "unseen" for those no
graph had.
"""

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from fp4compile.passes import names

# parameter -> the highest status any graph gave it: a site quantized it, over a site (or a custom operator)
# kept it in high precision, over a graph held it as no matmul's weight
_RANK = {"not_a_weight": 0, "skipped": 1, "fp4": 2}
_STATUS = WeakIdKeyDictionary()
# Modules whose matrices are not matmul weights: lookup tables, convolutions.
_NOT_MATMUL = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd)


def record(uses: list[tuple[str, str]], params: dict[str, torch.Tensor]) -> None:
    """Note what one graph did with the parameters it holds (``params``, by name): each weight in ``uses``
    (name, status) gets that status (a site's, for the weight matrices it takes; "skipped" for a custom
    operator's), any other parameter "not_a_weight"."""
    for joined, status in [(name, "not_a_weight") for name in params] + uses:
        for param in map(params.get, joined.split("+")):  # a weight computed from several
            if param is not None and _RANK[status] > _RANK.get(_STATUS.get(param), -1):
                _STATUS[param] = status


def coverage(model: nn.Module) -> dict[str, list[str]]:
    """The names of ``model``'s trainable weight matrices (parameters of 2 or more dims, held by a module
    that is not an embedding or a convolution) by what the fp4 backend did with them in this process:
    "fp4" (some site quantized it), "skipped" (kept in high precision by sites, taken by a custom
    operator the pass cannot see into, or passed into a subgraph whose matmuls are not rewritten, such as a
    custom autograd.Function's: each report says why), "not_a_weight" (compiled graphs used it,
    as no matmul's weight: a positional embedding, a class token; or mixed with activations before a
    matmul, which the report lists as a skipped activation x activation site) and "unseen" (no compiled
    graph used it: it ran eagerly, or has not run yet), each named as the reports name it (its FQN in the
    largest model holding it, without the wrappers of torch.compile, DDP or checkpointing). Call it after
    a training step."""
    found = {"fp4": [], "skipped": [], "not_a_weight": [], "unseen": []}
    seen = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NOT_MATMUL):
            continue
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            if param.dim() < 2 or not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            found[_STATUS.get(param, "unseen")].append(names.parameter_name(param) or name)
    return found
